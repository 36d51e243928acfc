-- Shared by every progress script. Key layout under prefix P (ARGV[1]):
--   P:pn:<key>  hash: client fields (JSON-encoded values) and server fields starting with '_':
--               _st start_time, _ut update_time, _c:<status json> children by status, _lm last
--               message (JSON), _eta, _op the progress last posted on the node itself (kept only
--               once the node is or was a parent: it is what the node shows when its children
--               weigh nothing), and _m, the numbers only the maths reads, packed as five
--               little-endian doubles (NaN: absent): Σw and Σw·p over the direct children, and
--               the ETA's rate anchor (time, progress) and rate. Packed, they cost one field to
--               read and write and no decimal parsing or formatting.
--   P:pc:<key>  zset of direct child keys scored by their start_time (the ordered child index)
--   P:proots    zset of tree roots scored by their latest update_time (retention scans it)
local P = ARGV[1]
local EPS = 1e-9

local function nkey(k) return P .. ':pn:' .. k end
local function ckey(k) return P .. ':pc:' .. k end

-- Formatting a double costs more than most Redis commands here, and a call writes the same few
-- values (the update time, whole sums) on every node it touches: each value is formatted once
-- per call. Whole numbers print as integers (the same text %.17g gives, without its
-- arbitrary-precision path); other values use %.17g, which round-trips a double exactly (Lua's
-- tostring keeps only 14 digits).
local floor, format = math.floor, string.format
local NUMS = {}
local function num(x)
  if x ~= x then return format('%.17g', x) end -- NaN cannot be a table key
  local s = NUMS[x]
  if s then return s end
  if x == floor(x) and x > -1e15 and x < 1e15 then s = format('%d', x) else s = format('%.17g', x) end
  NUMS[x] = s
  return s
end

-- The parent that progress rolls into, or nil at a tree root: a one-segment key, or a parent that
-- is a namespace (its last segment starts with '_').
local PARENTS = {}
local function parent_of(k)
  local known = PARENTS[k]
  if known ~= nil then return known or nil end
  -- Anchored, greedy patterns find the last '.' by backtracking from the end, in O(segment);
  -- an unanchored '%.[^%.]*$' retries from every position and cost twice as much per call.
  local p = string.match(k, '^(.*)%.') or false
  if p and (string.match(p, '^.*%.(.)') or string.sub(p, 1, 1)) == '_' then p = false end
  PARENTS[k] = p
  return p or nil
end

local TERMINAL = { ['"finished"'] = true, ['"failed"'] = true, ['"canceled"'] = true }

-- Node state for the length of one script call. Every node a call touches is read once (one
-- HMGET of the fields the maths needs) and written once at the end (`flush`), however many
-- updates of the batch pass through it: a burst of siblings costs one write of their parent,
-- not one per sibling. Updates are still applied one after another, in order, with the same
-- arithmetic as one at a time, so a batch leaves exactly the tree its updates leave singly.
-- Lua in Redis is slow at growing tables (every rehash reallocates), so a node's tables are
-- made at their final size by constructors; false stands for a field that is absent or unset.
-- scripts/profile-progress-lua.sh counts what an update costs.
local cache = {}

-- _m holds these five node fields, in this order: _sw, _swp, _rt, _rp, _rate.
local M_FORMAT = '<ddddd'
local PACKED = { _sw = true, _swp = true, _rt = true, _rp = true, _rate = true }

local function load(k)
  local n = cache[k]
  if n then return n end
  local nk = nkey(k)
  local v = redis.call('HMGET', nk, '_st', 'progress', 'weight', 'status', '_op', '_m')
  local sw, swp, rt, rp, rate = false, false, false, false, false
  if v[6] then
    sw, swp, rt, rp, rate = struct.unpack(M_FORMAT, v[6])
    if sw ~= sw then sw = false end
    if swp ~= swp then swp = false end
    if rt ~= rt then rt = false end
    if rp ~= rp then rp = false end
    if rate ~= rate then rate = false end
  end
  local f = { _st = v[1], progress = v[2], weight = v[3], _sw = sw, _swp = swp, status = v[4], _rt = rt,
    _rp = rp, _rate = rate, _op = v[5], _ut = false, _eta = false, _lm = false }
  -- `counts` is made on the first status change
  n = { f = f, dirty = { _ut = false, progress = false, _sw = false, _swp = false, _st = false }, nk = nk }
  cache[k] = n
  return n
end

-- Sets (or, with false, deletes) a field; written by `flush`. Computed numbers stay numbers
-- until then (formatted once per node and call, not once per update passing through).
local function set(n, name, value)
  n.f[name] = value
  n.dirty[name] = true
end

local function count(n, status, delta)
  local counts = n.counts
  if not counts then
    counts = {}
    n.counts = counts
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
local NAN = 0 / 0

-- Writes every node the call touched, and the changed roots into P:proots.
local function flush()
  for _, n in pairs(cache) do
    local f, ns, nd, packed = n.f, 0, 0, false
    for name, dirty in pairs(n.dirty) do
      if dirty then
        if PACKED[name] then
          packed = true
        else
          local value = f[name]
          if value then
            if type(value) == 'number' then value = num(value) end
            HSET_ARGS[ns + 1] = name; HSET_ARGS[ns + 2] = value; ns = ns + 2
          else
            nd = nd + 1; HDEL_ARGS[nd] = name
          end
        end
      end
    end
    if packed then
      local sw, swp, rt, rp, rate = f._sw, f._swp, f._rt, f._rp, f._rate
      if sw or swp or rt or rp or rate then
        HSET_ARGS[ns + 1] = '_m'
        HSET_ARGS[ns + 2] = struct.pack(M_FORMAT, sw or NAN, swp or NAN, rt or NAN, rp or NAN, rate or NAN)
        ns = ns + 2
      else
        nd = nd + 1; HDEL_ARGS[nd] = '_m'
      end
    end
    local nk = n.nk
    if ns > 0 then redis.call('HSET', nk, unpack(HSET_ARGS, 1, ns)) end
    if nd > 0 then redis.call('HDEL', nk, unpack(HDEL_ARGS, 1, nd)) end
    if n.counts then
      for status, delta in pairs(n.counts) do
        if delta ~= 0 and redis.call('HINCRBY', nk, '_c:' .. status, delta) <= 0 then
          redis.call('HDEL', nk, '_c:' .. status)
        end
      end
    end
  end
  cache = {}
  local n, pk = 0, P .. ':proots'
  for root, t in pairs(roots) do
    ZADD_ARGS[n + 1] = t; ZADD_ARGS[n + 2] = root; n = n + 2
    if n == 2 * ROOTS_PER_ZADD then
      redis.call('ZADD', pk, unpack(ZADD_ARGS, 1, n))
      n = 0
    end
  end
  if n > 0 then redis.call('ZADD', pk, unpack(ZADD_ARGS, 1, n)) end
  roots = {}
end

-- Refreshes the ETA of node `n` whose progress moved to p at time t, from an exponential moving
-- average of its rate, sampled at most once per ETA_SAMPLE_MS (anchor _rt/_rp, rate _rate): a
-- node updated a thousand times a second costs a comparison, not four more fields to write.
-- Terminal or complete: no ETA. Replaying an update at the same t changes nothing.
local ETA_SAMPLE_MS = 1000
local function update_eta(n, t, p, status)
  local f = n.f
  if (status and TERMINAL[status]) or p >= 1 then
    if f._rt then -- an ETA always comes with its rate anchor
      set(n, '_eta', false); set(n, '_rt', false); set(n, '_rp', false); set(n, '_rate', false)
    end
    return
  end
  local rt = f._rt
  if not rt then
    set(n, '_rt', t); set(n, '_rp', p)
    return
  end
  local rp = f._rp
  if p < rp then -- it went back: start measuring again
    set(n, '_rt', t); set(n, '_rp', p)
    return
  end
  if t - rt < ETA_SAMPLE_MS or p == rp then return end
  local inst = (p - rp) / (t - rt)
  local rate = f._rate
  if rate then rate = 0.3 * inst + 0.7 * rate else rate = inst end
  set(n, '_rt', t); set(n, '_rp', p); set(n, '_rate', rate)
  set(n, '_eta', math.floor(t + (1 - p) / rate))
end

-- Carries one child's change into its ancestors, one level at a time: O(depth), never O(children).
--   child: key whose contribution changed; created: the child did not exist before;
--   removed: the child was just deleted (it leaves the parent's child index);
--   dw, dwp: change of the child's weight and weight·progress (for a new child, its full values);
--   s_from, s_to: its status before and after (JSON text or false); lm: message to bubble or false.
-- Records the root of the tree in `roots`.
local function propagate(child, created, removed, child_start, dw, dwp, s_from, s_to, lm, t)
  local parent = parent_of(child)
  while parent do
    local n = load(parent)
    -- the hot fields are set in place (what `set` does, without a call per field)
    local f, dirty = n.f, n.dirty
    local p_created = not f._st
    local sw = (f._sw or 0) + dw
    local swp = (f._swp or 0) + dwp
    f._ut = t; dirty._ut = true
    if p_created then f._st = t; dirty._st = true end
    if created then
      redis.call('ZADD', ckey(parent), child_start, child)
    elseif removed then
      redis.call('ZREM', ckey(parent), child)
      -- no children left: the sums are exactly zero, whatever rounding accumulated
      if redis.call('ZCARD', ckey(parent)) == 0 then sw = 0; swp = 0 end
    end
    if s_from ~= s_to then
      if s_from then count(n, s_from, -1) end
      if s_to then count(n, s_to, 1) end
    end
    if not f._sw and f.progress then
      -- becoming a parent: remember the progress posted on it, which roll-ups now overwrite
      set(n, '_op', f.progress)
    end
    f._sw = sw; dirty._sw = true
    f._swp = swp; dirty._swp = true
    local had = f.progress
    local pp_old = tonumber(had) or 0
    -- Σw > 0: the weighted mean. Otherwise the progress posted on the node itself, or none, so
    -- the result depends only on the nodes' fields, never on history (a replayed batch changes
    -- nothing).
    local pp_new
    if sw > EPS then
      pp_new = swp / sw
      if pp_new < 0 then pp_new = 0 elseif pp_new > 1 then pp_new = 1 end
      f.progress = pp_new; dirty.progress = true
    else
      pp_new = tonumber(f._op)
      if pp_new then set(n, 'progress', f._op) elseif had then set(n, 'progress', false) end
    end
    if pp_new and (pp_new ~= pp_old or not had) then update_eta(n, t, pp_new, f.status) end
    pp_new = pp_new or 0
    if lm then set(n, '_lm', lm) end
    local pw = tonumber(f.weight) or 1
    if p_created then
      dw = pw; dwp = pw * pp_new
    else
      dw = 0; dwp = pw * pp_new - pw * pp_old
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
  local node = load(k)
  -- fields are set in place (what `set` does, without a call per field)
  local f, dirty = node.f, node.dirty
  local created = not f._st
  local p_old, w_old, s_old = tonumber(f.progress) or 0, tonumber(f.weight) or 1, f.status
  local p_new, w_new, s_new, lm = p_old, w_old, s_old, false
  local p_set = false
  f._ut = t; dirty._ut = true
  if created then f._st = t; dirty._st = true end
  for _ = 1, nf do
    local name, value = args[i], args[i + 1]
    i = i + 2
    f[name] = value; dirty[name] = true
    if name == 'progress' then
      p_new = tonumber(value); p_set = true
      if f._sw then set(node, '_op', value) end
    elseif name == 'weight' then w_new = tonumber(value)
    elseif name == 'status' then s_new = value
    elseif name == 'msg' then lm = value
    end
  end
  if lm then set(node, '_lm', lm) end
  if p_set or s_new ~= s_old then update_eta(node, t, p_new, s_new) end
  if created then
    propagate(k, true, false, t, w_new, w_new * p_new, false, s_new, lm, t)
  else
    propagate(k, false, false, t, w_new - w_old, w_new * p_new - w_old * p_old, s_old, s_new, lm, t)
  end
end
