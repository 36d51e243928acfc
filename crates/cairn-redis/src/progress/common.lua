-- Shared by every progress function of the library (library.rs); `begin` starts each call. Key
-- layout under prefix P (ARGV[1]), each family's suffix a KEY_* local from keys.rs:
--   P:pn:<key>  hash: client fields (JSON-encoded values) but progress, and server fields
--               starting with '_': _s the node's state (below), _st start_time, _c:<status json>
--               children by status, _lm last message (JSON), _eta (below), _op the progress last posted
--               on the node itself (kept only once the node is or was a parent: it is what the
--               node shows when its children weigh nothing).
--   P:pc:<key>  zset of direct child keys scored by their start_time (the ordered child index)
--   P:proots    zset of tree roots scored by their latest update_time (retention scans it)
--   P:pf:<root> the tree's change feed: a capped stream, one entry per call that changed the
--               tree: `k` the changed node keys, `d` the keys whose subtrees were deleted (both
--               space-separated). Its entry ids are the live event ids.
--   P:pfeed     the notification stream every ingress replica tails: one entry per call, field
--               <root> = the id of that root's new feed entry, or '-' when the feed was dropped
--               with the tree (purge).
--
-- _s packs, after a kind byte, little-endian doubles (NaN: absent) and then the status as its
-- JSON text (empty: none):
--   'l' (a leaf):   update_time, progress, weight, ETA rate anchor time and progress, rate
--   'Q' (a parent): update_time, Σw, Σw·p over the direct children, then the leaf's other five,
--                   then the low parts of Σw and Σw·p (below), then Σw·rate over the direct
--                   children, its low part, and how many children have a rate; 'P' is the same
--                   without the last three, written while no child has a rate (they are then
--                   zero); 'p', written by earlier versions, is also without the low parts.
-- _eta, the time a node should finish: for a leaf (and a parent whose children weigh nothing),
-- from an exponential moving average of its own rate (`update_eta`); for a parent, from its
-- weighted remaining work and its children's rates: rate = Σwᵢ·rateᵢ / Σwᵢ (a parent's rate is
-- this derived one, so it rolls up a level at a time like progress: it is how fast the parent's
-- progress moves while its children keep their pace), ETA = now + (1 − p) / rate. A finished,
-- failed or canceled node, or one at progress 1, has no rate and no ETA.
-- A parent's sums are kept compensated (a high and a low double, TwoSum): a child's weight can be
-- as large as 1e12 and as small as 1e-9, and without the low part adding and then removing a heavy
-- child would leave its rounding error in the sum for good (1e12 + 0.1 - 1e12 gives 0.10009765625).
-- With it, what remains is exact to about 1e-20 of the largest weight ever added.
-- A node exists exactly when it has _s. It is the one field the maths reads (HGET: a third of
-- the cost of reading six text fields, and no decimal parsing) and the one every write sets: a
-- node's update time and progress live only here (the read path decodes them), so a leaf's
-- write is one field and no number is formatted. A leaf's _s is 49 bytes and its status's JSON
-- text: with a status of up to 13 characters it stays within Redis's compact hash encoding (64
-- bytes a value; "running" makes 58).
-- P is the prefix; NODE_KEYS and CHILD_KEYS the two per-node families under it, joined once per
-- call (`begin`): a node's key is then one concatenation.
-- TAGGED: the call uses the hash-tagged layout of a Redis Cluster (docs/contract.md §8), chosen
-- by the caller: it is on exactly when the key the caller declares (KEYS[1]) carries a tag. A
-- tree's keys then carry its root as the tag, `P:pn:{<root>}<rest of the key>`,
-- `P:pc:{<root>}…`, `P:pf:{<root>}`, so every key of a tree is in one slot; and the keys of no
-- tree (P:proots, P:pfeed, P:streams) are not written by the call but returned to the caller,
-- which writes them after it (`deferred`). Without a tag the layout is the one above.
local P, NODE_KEYS, CHILD_KEYS, TAGGED
local EPS = 1e-9

-- Formatting a double costs more than most Redis commands here, and a call writes the same few
-- values (the update time, whole sums) on every node it touches: each value is formatted once
-- per call. Whole numbers print as integers (the same text %.17g gives, without its
-- arbitrary-precision path); other values use %.17g, which round-trips a double exactly (Lua's
-- tostring keeps only 14 digits). Numbers go to redis.call as `num` text too: a number argument
-- is formatted again on every call.
local NUMS = {}
local function num(x)
  if x ~= x then return string.format('%.17g', x) end -- NaN cannot be a table key
  local s = NUMS[x]
  if s then return s end
  if x == math.floor(x) and x > -1e15 and x < 1e15 then
    s = string.format('%d', x)
  else
    s = string.format('%.17g', x)
  end
  NUMS[x] = s
  return s
end

-- A number from its ARGV text (a field count, a progress or weight): parsed once per distinct
-- text, as the updates of a batch mostly share their field count and often their values.
local NUMBERS = {}
local function number_of(text)
  local x = NUMBERS[text]
  if x then return x end
  x = tonumber(text)
  NUMBERS[text] = x
  return x
end

-- A time (ms since the epoch, an integer's text as Rust writes it) likewise; its text is what
-- `num` gives for it, so it is kept there.
local function time_of(text)
  local t = NUMBERS[text]
  if t then return t end
  t = tonumber(text)
  NUMBERS[text] = t
  NUMS[t] = text
  return t
end

-- The parent that progress rolls into, or nil at a tree root: a one-segment key, or a parent that
-- is a namespace (its last segment starts with '_'). One anchored, greedy match per key finds
-- the text before its last '.' (it backtracks from the end, in O(segment)); a C call from Lua
-- costs more than the matching, so plain finds over every '.' cost twice as much, and an
-- unanchored pattern retries from every position. Both results are kept for the call.
local UNDERSCORE = 95
local BEFORE_LAST_DOT, PARENTS = {}, {}
local function before_last_dot(k)
  local p = BEFORE_LAST_DOT[k]
  if p == nil then
    p = string.match(k, '^(.*)%.') or false
    BEFORE_LAST_DOT[k] = p
  end
  return p
end
local function parent_of(k)
  local known = PARENTS[k]
  if known ~= nil then return known or nil end
  local p = before_last_dot(k)
  if p then
    local pp = before_last_dot(p)
    if string.byte(p, pp and #pp + 2 or 1) == UNDERSCORE then p = false end
  end
  PARENTS[k] = p
  return p or nil
end

-- The root of a key's tree, kept for the call.
local ROOT_OF = {}
local function root_of(k)
  local r = ROOT_OF[k]
  if r then return r end
  r = k
  local p = parent_of(r)
  while p do
    r = p
    p = parent_of(r)
  end
  ROOT_OF[k] = r
  return r
end

-- A key's part of its node and child index keys: the key itself, or with TAGGED its root as the
-- hash tag and then the rest of the key.
local function item(k)
  if not TAGGED then return k end
  local r = root_of(k)
  if #r == #k then return '{' .. k .. '}' end
  return '{' .. r .. '}' .. string.sub(k, #r + 1)
end
local function nkey(k)
  if TAGGED then return NODE_KEYS .. item(k) end
  return NODE_KEYS .. k
end
local function ckey(k)
  if TAGGED then return CHILD_KEYS .. item(k) end
  return CHILD_KEYS .. k
end
-- A tree's change feed.
local function feed_key(root)
  if TAGGED then return P .. KEY_FEED .. '{' .. root .. '}' end
  return P .. KEY_FEED .. root
end

-- What a TAGGED call leaves to its caller, the writes outside the tree's slot: roots to index
-- (score, root, …), roots to take out of the index, notifications (root, feed id, …) and streams
-- to register.
local DEFERRED_ROOTS, DEFERRED_UNROOTS, DEFERRED_NOTES, DEFERRED_STREAMS = {}, {}, {}, {}

-- Takes a deleted tree's root out of P:proots.
local function unindex_root(root)
  if TAGGED then
    DEFERRED_UNROOTS[#DEFERRED_UNROOTS + 1] = root
  else
    redis.call('ZREM', P .. KEY_ROOTS, root)
  end
end

-- A function's reply: `result` itself, or with TAGGED `{ result, roots, unroots, notes, streams }`
-- (what the call left to its caller). An error reply goes back as it is.
local function deferred(result)
  if not TAGGED or (type(result) == 'table' and result.err) then return result end
  return { result, DEFERRED_ROOTS, DEFERRED_UNROOTS, DEFERRED_NOTES, DEFERRED_STREAMS }
end

local TERMINAL = { ['"finished"'] = true, ['"failed"'] = true, ['"canceled"'] = true }

-- Slots of a node table (see `load`).
local NK, EXISTS, CREATED, UT, SW, SWP, PR, W, RT, RP, RATE, STATUS, ETA, OP, OPD, LM, CF, COUNTS, SWL, SWPL,
  SWR, SWRL, NR = 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23

local LEAF, PARENT, PARENT_V2, PARENT_V1 = 108, 81, 80, 112 -- 'l', 'Q', 'P', 'p'
local LEAF_FORMAT, PARENT_FORMAT = '<Bdddddd', '<Bddddddddddddd'
local PARENT_V2_FORMAT, PARENT_V1_FORMAT = '<Bdddddddddd', '<Bdddddddd'
local NAN = 0 / 0

-- The state in _s: ut, sw, swp (false for a leaf), p, w, rt, rp, rate, status (false: absent),
-- swl, swpl (the sums' low parts), swr, swrl (Σw·rate and its low part), nr (children with a
-- rate); the last five false for a leaf.
local function decode(s)
  local kind, ut, sw, swp, p, w, rt, rp, rate, at
  local swl, swpl, swr, swrl, nr = false, false, false, false, false
  local k = string.byte(s, 1)
  if k == PARENT then
    kind, ut, sw, swp, p, w, rt, rp, rate, swl, swpl, swr, swrl, nr, at = struct.unpack(PARENT_FORMAT, s)
  elseif k == PARENT_V2 then
    kind, ut, sw, swp, p, w, rt, rp, rate, swl, swpl, at = struct.unpack(PARENT_V2_FORMAT, s)
    swr, swrl, nr = 0, 0, 0
  elseif k == PARENT_V1 then
    kind, ut, sw, swp, p, w, rt, rp, rate, at = struct.unpack(PARENT_V1_FORMAT, s)
    swl, swpl, swr, swrl, nr = 0, 0, 0, 0, 0
  else
    sw, swp = false, false
    kind, ut, p, w, rt, rp, rate, at = struct.unpack(LEAF_FORMAT, s)
  end
  local status = false
  if at <= #s then status = string.sub(s, at) end
  if p ~= p then p = false end
  if rt ~= rt then rt = false; rp = false end -- the anchor's two parts come together
  if rate ~= rate then rate = false end
  return ut, sw, swp, p, w, rt, rp, rate, status, swl, swpl, swr, swrl, nr
end

local function encode(n)
  local s
  if n[SW] then
    if n[NR] > 0 then
      s = struct.pack(PARENT_FORMAT, PARENT, n[UT], n[SW], n[SWP], n[PR] or NAN, n[W], n[RT] or NAN, n[RP] or NAN,
        n[RATE] or NAN, n[SWL], n[SWPL], n[SWR], n[SWRL], n[NR])
    else -- no child has a rate (Σw·rate is then 0): the shorter form, cheaper to pack and unpack
      s = struct.pack(PARENT_V2_FORMAT, PARENT_V2, n[UT], n[SW], n[SWP], n[PR] or NAN, n[W], n[RT] or NAN,
        n[RP] or NAN, n[RATE] or NAN, n[SWL], n[SWPL])
    end
  else
    s = struct.pack(LEAF_FORMAT, LEAF, n[UT], n[PR] or NAN, n[W], n[RT] or NAN, n[RP] or NAN, n[RATE] or NAN)
  end
  if n[STATUS] then return s .. n[STATUS] end
  return s
end

-- Node state for the length of one script call. Every node a call touches is read once (HGET of
-- _s) and written once at the end (`flush`), however many updates of the batch pass through it:
-- a burst of siblings costs one write of their parent, not one per sibling. Updates are still
-- applied one after another, in order, with the same arithmetic as one at a time, so a batch
-- leaves exactly the tree its updates leave singly. A node is one table made at its final size
-- by a constructor, its slots in the array part: Lua in Redis is slow at growing tables, and a
-- constructor of named fields costs three times one of positions. Its slots, by the names below:
--   NK its Redis key; EXISTS; CREATED: false, or the time the call made it (its _st);
--   UT, SW, SWP, PR (progress), W (weight), RT, RP, RATE, STATUS: the state _s holds;
--   ETA: false unchanged, a time to write, or REMOVE;
--   OP: _op (UNREAD until needed: only a parent whose children weigh nothing reads it), OPD: write it;
--   LM: last message to write; CF: client field name/value pairs to write; COUNTS: status deltas.
-- scripts/profile-progress-lua.sh counts what an update costs.
local REMOVE, UNREAD = {}, {}
local cache = {}

local function load(k)
  local n = cache[k]
  if n then return n end
  local nk = nkey(k)
  local s = redis.call('HGET', nk, '_s')
  if s then
    local ut, sw, swp, p, w, rt, rp, rate, status, swl, swpl, swr, swrl, nr = decode(s)
    n = { nk, true, false, ut, sw, swp, p, w, rt, rp, rate, status, false, sw and UNREAD or false, false, false,
      false, false, swl, swpl, swr, swrl, nr }
  else
    n = { nk, false, false, false, false, false, false, 1, false, false, false, false, false, false, false, false,
      false, false, false, false, false, false, false }
  end
  cache[k] = n
  return n
end

local function op_of(n)
  if n[OP] == UNREAD then n[OP] = redis.call('HGET', n[NK], '_op') or false end
  return n[OP]
end

local function count(n, status, delta)
  local counts = n[COUNTS]
  if not counts then
    counts = {}
    n[COUNTS] = counts
  end
  counts[status] = (counts[status] or 0) + delta
end

-- Roots of the trees a call changed, with their latest update time (`flush` indexes them).
local roots = {}

-- Roots indexed by one ZADD (a burst of request lifecycles touches a thousand roots; unpack's
-- stack stays far below Lua's limit).
local ROOTS_PER_ZADD = 500

-- Argument buffers shared by every flush (entries past the count in use are stale).
local HSET_ARGS, HDEL_ARGS, ZADD_ARGS = {}, {}, {}

-- Most arguments one HSET gets: unpack() cannot pass more than about 8000 values from Lua, and a
-- batch may touch one node thousands of times, each time with a few fields.
local HSET_MAX_ARGS = 1000

-- The client fields of a node as name/value pairs, each name once with its last value (the list
-- holds every write of the call in order; it is only deduplicated when long, where it matters).
local function distinct_fields(cf)
  if #cf <= 2 * 64 then return cf end
  local seen, out = {}, {}
  for j = #cf - 1, 1, -2 do
    local name = cf[j]
    if not seen[name] then
      seen[name] = true
      out[#out + 1] = name; out[#out + 1] = cf[j + 1]
    end
  end
  return out
end

-- The change feed (see the key layout). Written by `flush` and the deletes in the same call as
-- the change itself, so a reader of a feed never sees a state the feed does not name.
local FEED_MAXLEN = 10000
-- Keys whose subtrees this call deleted, by tree root; and whether the feed goes with the tree.
local FEED_DELETED, FEED_DROP = {}, false

-- Appends one entry per changed tree (`changed`: root -> list of keys) and one notification, and
-- registers the streams for the trimmer (P:streams; its policy for pf:* and pfeed keeps 10 000
-- entries and one hour). Roots go in chunks, like the ZADD of `flush`.
local NOTE_ARGS, REG_ARGS = {}, {}
local function feed_write(changed)
  local n, r = 0, 0
  local note = P .. KEY_NOTIFY
  local function send()
    if TAGGED then
      for j = 1, n do DEFERRED_NOTES[#DEFERRED_NOTES + 1] = NOTE_ARGS[j] end
      for j = 1, r do DEFERRED_STREAMS[#DEFERRED_STREAMS + 1] = REG_ARGS[j] end
    else
      redis.call('XADD', note, 'MAXLEN', '~', FEED_MAXLEN, '*', unpack(NOTE_ARGS, 1, n))
      REG_ARGS[r + 1] = note
      redis.call('SADD', P .. KEY_STREAMS, unpack(REG_ARGS, 1, r + 1))
    end
    n, r = 0, 0
  end
  for root, keys in pairs(changed) do
    local fk = feed_key(root)
    local id
    local deleted = FEED_DELETED[root]
    if FEED_DROP then
      redis.call('DEL', fk)
      id = '-'
    else
      if deleted then
        id = redis.call('XADD', fk, 'MAXLEN', '~', FEED_MAXLEN, '*', 'k', table.concat(keys, ' '), 'd',
          table.concat(deleted, ' '))
      else
        id = redis.call('XADD', fk, 'MAXLEN', '~', FEED_MAXLEN, '*', 'k', table.concat(keys, ' '))
      end
      r = r + 1; REG_ARGS[r] = fk
    end
    NOTE_ARGS[n + 1] = root; NOTE_ARGS[n + 2] = id; n = n + 2
    if n == 2 * ROOTS_PER_ZADD then send() end
  end
  if n > 0 then send() end
  FEED_DELETED = {}
end

-- Writes every node the call touched, the changed roots into P:proots, and the change feed.
local function flush()
  local a, d = HSET_ARGS, HDEL_ARGS
  local changed = {}
  for root in pairs(FEED_DELETED) do changed[root] = {} end
  for k, n in pairs(cache) do
    local r = root_of(k)
    local keys = changed[r]
    if keys then keys[#keys + 1] = k else changed[r] = { k } end
    a[1] = '_s'; a[2] = encode(n)
    local na, nd = 2, 0
    if n[CREATED] then a[3] = '_st'; a[4] = num(n[CREATED]); na = 4 end
    local eta = n[ETA]
    if eta == REMOVE then
      nd = nd + 1; d[nd] = '_eta'
    elseif eta then
      a[na + 1] = '_eta'; a[na + 2] = num(eta); na = na + 2
    end
    if n[OPD] then a[na + 1] = '_op'; a[na + 2] = n[OP]; na = na + 2 end
    if n[LM] then a[na + 1] = '_lm'; a[na + 2] = n[LM]; na = na + 2 end
    local nk = n[NK]
    local cf = n[CF]
    if cf then
      cf = distinct_fields(cf)
      for j = 1, #cf do
        a[na + 1] = cf[j]; na = na + 1
        if na == HSET_MAX_ARGS then
          redis.call('HSET', nk, unpack(a, 1, na))
          na = 0
        end
      end
    end
    if na > 0 then redis.call('HSET', nk, unpack(a, 1, na)) end
    if nd > 0 then redis.call('HDEL', nk, unpack(d, 1, nd)) end
    if n[COUNTS] then
      for status, delta in pairs(n[COUNTS]) do
        if delta ~= 0 and redis.call('HINCRBY', nk, '_c:' .. status, delta) <= 0 then
          redis.call('HDEL', nk, '_c:' .. status)
        end
      end
    end
  end
  cache = {}
  local n, pk = 0, P .. KEY_ROOTS
  if TAGGED then
    for root, t in pairs(roots) do
      DEFERRED_ROOTS[#DEFERRED_ROOTS + 1] = num(t); DEFERRED_ROOTS[#DEFERRED_ROOTS + 1] = root
    end
    roots = {}
  end
  for root, t in pairs(roots) do
    ZADD_ARGS[n + 1] = num(t); ZADD_ARGS[n + 2] = root; n = n + 2
    if n == 2 * ROOTS_PER_ZADD then
      redis.call('ZADD', pk, unpack(ZADD_ARGS, 1, n))
      n = 0
    end
  end
  if n > 0 then redis.call('ZADD', pk, unpack(ZADD_ARGS, 1, n)) end
  roots = {}
  feed_write(changed)
end

-- Refreshes the ETA of node `n` whose progress moved to p at time t, from an exponential moving
-- average of its rate, sampled at most once per ETA_SAMPLE_MS (anchor rt/rp, rate): a node
-- updated a thousand times a second costs a comparison. Terminal or complete: no ETA. Replaying
-- an update at the same t changes nothing.
local ETA_SAMPLE_MS = 1000
local function update_eta(n, t, p, status)
  if (status and TERMINAL[status]) or p >= 1 then
    if n[RT] then -- an ETA always comes with its rate anchor
      n[ETA] = REMOVE; n[RT] = false; n[RP] = false; n[RATE] = false
    end
    return
  end
  local rt, rp = n[RT], n[RP]
  -- No anchor yet, or it went back: start measuring again. An update older than the anchor (a
  -- replayed batch) never moves it, so replays leave the rate as it was.
  if not rt or (p < rp and t >= rt) then
    n[RT] = t; n[RP] = p
    return
  end
  if t - rt < ETA_SAMPLE_MS or p == rp then return end
  local inst = (p - rp) / (t - rt)
  local rate = n[RATE]
  if rate then rate = 0.3 * inst + 0.7 * rate else rate = inst end
  n[RT] = t; n[RP] = p; n[RATE] = rate
  n[ETA] = math.floor(t + (1 - p) / rate)
end

-- Refreshes the rate and ETA of node `n` at time t, now at progress p with status `status`; `moved`:
-- its progress or status just changed. A parent whose children weigh something takes its rate
-- from them (Σw·rate / Σw: its RATE then has no anchor RT); any other node measures its own.
local function refresh_eta(n, t, p, status, moved)
  local sw = n[SW]
  if sw and sw + n[SWL] > EPS then
    local had = n[RATE] or n[RT]
    n[RT] = false; n[RP] = false
    local rate = (n[SWR] + n[SWRL]) / (sw + n[SWL])
    if rate > 0 and p < 1 and not (status and TERMINAL[status]) then
      n[RATE] = rate
      n[ETA] = math.floor(t + (1 - p) / rate)
    else
      n[RATE] = false
      if had then n[ETA] = REMOVE end
    end
    return
  end
  if n[RATE] and not n[RT] then -- its rate came from children it no longer has (or that weigh nothing)
    n[RATE] = false; n[ETA] = REMOVE
  end
  if moved then update_eta(n, t, p, status) end
end

-- hi + lo + x as a new (hi, lo): TwoSum keeps the rounding error of the addition in lo.
local function acc(hi, lo, x)
  if x == 0 then return hi, lo end
  local s = hi + x
  local bb = s - hi
  return s, lo + ((hi - (s - bb)) + (x - bb))
end

-- The same value with as much of it as possible in hi.
local function renormalize(hi, lo)
  local s = hi + lo
  return s, lo - (s - hi)
end

-- Carries one child's change into its ancestors, one level at a time: O(depth), never O(children).
--   child: key whose contribution changed; created: the child did not exist before;
--   removed: the child was just deleted (it leaves the parent's child index);
--   w_add, w_sub, wp_add, wp_sub: the child's weight and weight·progress as now counted, and as
--     counted before (zero for a new child): added and taken away as separate terms, so that the
--     very value once added is the one later taken away, and the compensated sums stay exact;
--   wr_add, wr_sub: the same for its weight·rate;
--   s_from, s_to: its status before and after (JSON text or false); lm: message to bubble or false.
-- Records the root of the tree in `roots`.
local function propagate(child, created, removed, child_start, w_add, w_sub, wp_add, wp_sub, wr_add, wr_sub, s_from,
                         s_to, lm, t)
  local parent = parent_of(child)
  while parent do
    local n = load(parent)
    local p_created = not n[EXISTS]
    n[UT] = t
    if p_created then n[EXISTS] = true; n[CREATED] = t end
    local sw, swp, swl, swpl = n[SW], n[SWP], n[SWL], n[SWPL]
    if not sw then
      -- becoming a parent: remember the progress posted on it, which roll-ups now overwrite
      sw = 0; swp = 0; swl = 0; swpl = 0
      n[SWR] = 0; n[SWRL] = 0; n[NR] = 0
      if n[PR] then n[OP] = num(n[PR]); n[OPD] = true end
    end
    local rate_old = n[RATE]
    sw, swl = acc(sw, swl, w_add); sw, swl = acc(sw, swl, -w_sub); sw, swl = renormalize(sw, swl)
    swp, swpl = acc(swp, swpl, wp_add); swp, swpl = acc(swp, swpl, -wp_sub); swp, swpl = renormalize(swp, swpl)
    if wr_add ~= wr_sub then -- most updates change no rate (a rate is sampled once a second)
      local nr = n[NR]
      if wr_add > 0 then nr = nr + 1 end
      if wr_sub > 0 then nr = nr - 1 end
      if nr > 0 then
        local swr, swrl = acc(n[SWR], n[SWRL], wr_add)
        swr, swrl = acc(swr, swrl, -wr_sub)
        n[SWR], n[SWRL] = renormalize(swr, swrl)
        n[NR] = nr
      else
        -- no child has a rate: the sum is exactly zero, whatever rounding left (and a tree written
        -- before rates were summed starts counting here)
        n[SWR] = 0; n[SWRL] = 0; n[NR] = 0
      end
    end
    if created then
      redis.call('ZADD', ckey(parent), num(child_start), child)
    elseif removed then
      redis.call('ZREM', ckey(parent), child)
      if redis.call('ZCARD', ckey(parent)) == 0 then
        -- no children left: the sums are exactly zero, and the node keeps the progress it last
        -- had (it becomes what was posted on it)
        sw = 0; swp = 0; swl = 0; swpl = 0
        n[SWR] = 0; n[SWRL] = 0; n[NR] = 0
        if n[PR] then n[OP] = num(n[PR]); n[OPD] = true end
      end
    end
    if s_from ~= s_to then
      if s_from then count(n, s_from, -1) end
      if s_to then count(n, s_to, 1) end
    end
    n[SW] = sw; n[SWP] = swp; n[SWL] = swl; n[SWPL] = swpl
    sw = sw + swl; swp = swp + swpl
    local had = n[PR]
    local pp_old = had or 0
    -- Σw > 0: the weighted mean. Otherwise the progress posted on the node itself, or none, so
    -- the result depends only on the nodes' fields, never on history (a replayed batch changes
    -- nothing).
    local pp_new
    if sw > EPS then
      pp_new = swp / sw
      if pp_new < 0 then pp_new = 0 elseif pp_new > 1 then pp_new = 1 end
      n[PR] = pp_new
    else
      local op = op_of(n)
      pp_new = op and tonumber(op)
      n[PR] = pp_new or false
    end
    -- (a parent with neither children's rates nor a rate of its own has nothing to refresh)
    if n[SWR] ~= 0 or rate_old or n[RT] or sw <= EPS then
      refresh_eta(n, t, pp_new or 0, n[STATUS], pp_new and (pp_new ~= pp_old or not had))
    end
    pp_new = pp_new or 0
    if lm then n[LM] = lm end
    local pw = n[W]
    local rate_new = n[RATE]
    wr_add = rate_new and pw * rate_new or 0
    wr_sub = (not p_created and rate_old) and pw * rate_old or 0
    if p_created then
      w_add = pw; w_sub = 0; wp_add = pw * pp_new; wp_sub = 0
    else
      w_add = 0; w_sub = 0; wp_add = pw * pp_new; wp_sub = pw * pp_old
    end
    created = p_created
    removed = false
    child_start = t
    s_from = false; s_to = false
    child = parent
    parent = parent_of(child)
  end
  roots[child] = t
end

-- Applies one update to node k at time t: its nf fields are the name/value pairs args[i],
-- args[i + 1], ... (values JSON text), merged into the node; then the change goes up the tree.
local function apply_update(k, t, args, i, nf)
  local n = load(k)
  local created = not n[EXISTS]
  local p_old, w_old, s_old, r_old = n[PR] or 0, n[W], n[STATUS], n[RATE] or 0
  local p_new, w_new, s_new, lm = p_old, w_old, s_old, false
  local p_set = false
  n[UT] = t
  if created then n[EXISTS] = true; n[CREATED] = t end
  for _ = 1, nf do
    local name, value = args[i], args[i + 1]
    i = i + 2
    if name == 'progress' then
      p_new = number_of(value); p_set = true
      n[PR] = p_new
      if n[SW] then n[OP] = value; n[OPD] = true end
    else
      local cf = n[CF]
      if not cf then
        cf = {}
        n[CF] = cf
      end
      cf[#cf + 1] = name; cf[#cf + 1] = value
      if name == 'weight' then
        w_new = number_of(value); n[W] = w_new
      elseif name == 'status' then
        s_new = value; n[STATUS] = value
      elseif name == 'msg' then
        lm = value
      end
    end
  end
  if lm then n[LM] = lm end
  refresh_eta(n, t, p_new, s_new, p_set or s_new ~= s_old)
  local r_new = n[RATE] or 0
  if created then
    propagate(k, true, false, t, w_new, 0, w_new * p_new, 0, w_new * r_new, 0, false, s_new, lm, t)
  else
    propagate(k, false, false, t, w_new, w_old, w_new * p_new, w_old * p_old, w_new * r_new, w_old * r_old, s_old, s_new,
      lm, t)
  end
end

-- Starts a call of a function using this code: the prefix, the layout (TAGGED when the first of
-- `keys`, the function's KEYS, carries a hash tag) and fresh per-call state (the library's top
-- level runs once; these tables would otherwise carry one call's nodes into the next).
local function begin(prefix, keys)
  P = prefix
  TAGGED = keys ~= nil and keys[1] ~= nil and string.find(keys[1], '{', 1, true) ~= nil
  DEFERRED_ROOTS, DEFERRED_UNROOTS, DEFERRED_NOTES, DEFERRED_STREAMS = {}, {}, {}, {}
  NODE_KEYS, CHILD_KEYS = prefix .. KEY_NODE, prefix .. KEY_CHILDREN
  NUMS, NUMBERS, BEFORE_LAST_DOT, PARENTS = {}, {}, {}, {}
  cache, roots = {}, {}
  FEED_DELETED, FEED_DROP, ROOT_OF = {}, false, {}
end
