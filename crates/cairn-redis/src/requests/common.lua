-- Shared by the request functions of the library (library.rs), after the progress store's
-- common.lua (its `begin` sets the key prefix P from ARGV[1]); `begin_requests` takes ARGV[2]
-- stream key and ARGV[3] group. Key families (KEY_* locals) come from keys.rs:
--   P:req:<T><id>     hash: the request record (field names in cairn_requests::record::fields)
--   <stream>          the request stream of one partition (KEYS[1]); its consumer group's PEL
--                     holds the leases
--   P:dead<T>         dead-letter stream
--   <reply_to>        the submitting ingress replica's reply stream (named in the record)
--   P:req:finished<T> zset of finished request ids scored by finished_ms (the trimmer purges
--                     from it)
--   P:streams         registry of every stream Cairn creates (the trimmer finds them here)
-- <T> (PT below) is the partition's hash tag on a Redis Cluster (`{p3}`), taken from the stream
-- key the caller declares, and empty on one Redis (keys.rs, `requests`). With a tag (TAGGED) a
-- call touches its partition's slot only: what lives elsewhere (the request's progress node, the
-- replica's reply stream, the registry) is returned to the caller, which writes it after the
-- call (`answer`); the streams of a partition are registered when its group is made. So that a
-- caller killed before those writes loses nothing, a finished entry is then acked by the caller
-- after them, not by the call: until then it stays pending, and whichever processor reclaims it
-- finds the record finished and tells again (`retell`).
local STREAM, GROUP, PT
local DEFERRED_NODES, DEFERRED_REPLIES, DEFERRED_ACKS = {}, {}, {}
local function rkey(id) return P .. KEY_RECORD .. PT .. id end

-- The consumer that holds the entry's lease, or nil when the entry is not pending at all.
local function owner_of(entry)
  local p = redis.call('XPENDING', STREAM, GROUP, entry, entry, 1)
  if p[1] == nil then return nil end
  return p[1][2]
end

local TERMINAL_STATES = { succeeded = true, canceled = true, dead = true }

-- Tells the waiting ingress replica; its stream is capped, expires with the replica and is
-- registered for the trimmer. Every terminal transition passes here (finish, and cancel.lua for
-- a request that never started), so this is also where the record joins the finished index.
-- A batch of outcomes mostly answers one replica: its stream's expiry and registration are
-- refreshed once per script call.
local REFRESHED = {}

-- The status a terminal state shows on the request's progress node (cairn_requests'
-- RequestState::progress_status).
local NODE_STATUS = { succeeded = '"finished"', canceled = '"canceled"', dead = '"failed"' }
local MAX_NODE_MSG = 1024

-- Writes a terminal state to the request's own progress node in the step that stores it (the
-- script calling it ends with one `flush` for all its requests: one feed entry per call), so
-- the node ends as the record does whatever happens to the processor's AMQP reports (a lost
-- commit reply, RabbitMQ away, the processor killed). The processor's report of the same state
-- arrives later and changes nothing.
local function show_terminal(id, state, now)
  local v = redis.call('HMGET', rkey(id), 'progress_key', 'attempts', 'handler', 'error')
  local key = v[1]
  if not key or key == '' then return end
  local args = { 'status', NODE_STATUS[state], 'state', cjson.encode(state) }
  if v[2] then args[#args + 1] = 'attempts'; args[#args + 1] = v[2] end
  if v[3] then args[#args + 1] = 'handler'; args[#args + 1] = cjson.encode(v[3]) end
  if state == 'succeeded' then
    args[#args + 1] = 'progress'; args[#args + 1] = '1'
  elseif v[4] and v[4] ~= '' then
    local msg = v[4]
    if #msg > MAX_NODE_MSG then
      local cut = MAX_NODE_MSG
      -- never split a UTF-8 sequence: back off over continuation bytes
      while cut > 0 and string.byte(msg, cut + 1) and string.byte(msg, cut + 1) >= 128
        and string.byte(msg, cut + 1) < 192 do
        cut = cut - 1
      end
      msg = string.sub(msg, 1, cut) .. '…'
    end
    args[#args + 1] = 'msg'; args[#args + 1] = cjson.encode(msg)
  end
  if TAGGED then
    -- the node's tree is in another slot: { key, time, name, JSON, … } for the caller to apply
    table.insert(args, 1, now)
    table.insert(args, 1, key)
    DEFERRED_NODES[#DEFERRED_NODES + 1] = args
    return
  end
  apply_update(key, now, args, 1, #args / 2)
end

local function reply(id, state, now)
  if TERMINAL_STATES[state] then
    redis.call('ZADD', P .. KEY_FINISHED .. PT, now, id)
    show_terminal(id, state, now)
  end
  local to = redis.call('HGET', rkey(id), 'reply_to')
  if to and to ~= '' and TAGGED then
    DEFERRED_REPLIES[#DEFERRED_REPLIES + 1] = { to, id, state, now }
  elseif to and to ~= '' then
    redis.call('XADD', to, 'MAXLEN', '~', 10000, '*', 'id', id, 'state', state, 'time', now)
    if not REFRESHED[to] then
      redis.call('PEXPIRE', to, 3600000)
      redis.call('SADD', P .. KEY_STREAMS, to)
      REFRESHED[to] = true
    end
  end
end

local function finish(id, entry, state, now, result, err)
  local args = { 'state', state, 'finished_ms', now }
  if result and result ~= '' then args[5] = 'result'; args[6] = result end
  if err and err ~= '' then args[#args + 1] = 'error'; args[#args + 1] = err end
  redis.call('HSET', rkey(id), unpack(args))
  if TAGGED then
    DEFERRED_ACKS[#DEFERRED_ACKS + 1] = entry
  else
    redis.call('XACK', STREAM, GROUP, entry)
  end
  if state == 'dead' then
    redis.call('XADD', P .. KEY_DEAD .. PT, '*', 'id', id, 'error', err or '', 'time', now)
    if not TAGGED then redis.call('SADD', P .. KEY_STREAMS, P .. KEY_DEAD) end
  end
  reply(id, state, now)
end

-- On a cluster, the step for an entry whose request is already finished in `state`: its node's
-- terminal state and its reply again (the step that finished it may have been cut off before
-- its caller wrote them; both are idempotent), then the ack, all left to the caller.
local function retell(id, entry, state, now)
  show_terminal(id, state, now)
  local to = redis.call('HGET', rkey(id), 'reply_to')
  if to and to ~= '' then DEFERRED_REPLIES[#DEFERRED_REPLIES + 1] = { to, id, state, now } end
  DEFERRED_ACKS[#DEFERRED_ACKS + 1] = entry
end

-- Redis's own clock in ms (for claims, which every ingress replica must judge alike).
local function redis_now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Who claims an upload for a submission (blobs/claim.lua; `upload_claimant` in blobs/mod.rs):
-- its idempotency key when it has one, so a repeat racing its first submission shares the
-- claim and is answered by it, else its request id.
local function upload_claimant(id, idem)
  if idem ~= '' then return 'idem:' .. idem end
  return 'req:' .. id
end

-- Starts a call of a request function: `begin` (prefix, layout, per-call state), then stream
-- (KEYS[1]), group and the partition's tag.
local function begin_requests(args, keys)
  begin(args[1], keys)
  STREAM, GROUP = keys[1], args[3]
  PT = TAGGED and string.match(keys[1], '{[^}]*}') or ''
  REFRESHED, DEFERRED_NODES, DEFERRED_REPLIES, DEFERRED_ACKS = {}, {}, {}, {}
end

-- A request function's reply: `result`, or with TAGGED `{ result, nodes, replies, acks }`, the
-- terminal states to show on progress nodes ({ key, time, name, JSON, … }), the replies to
-- send ({ reply stream, id, state, time }) and then the entries to ack that the call left to its
-- caller.
local function answer(result)
  if not TAGGED then return result end
  return { result, DEFERRED_NODES, DEFERRED_REPLIES, DEFERRED_ACKS }
end
