-- Shared by the request scripts. ARGV[1] prefix, ARGV[2] stream key, ARGV[3] group.
--   P:req:<id>        hash: the request record (field names in cairn_requests::record::fields)
--   <stream>          the request stream; its consumer group's PEL holds the leases
--   P:dead            dead-letter stream
--   <reply_to>        the submitting ingress replica's reply stream (named in the record)
local P, STREAM, GROUP = ARGV[1], ARGV[2], ARGV[3]
local function rkey(id) return P .. ':req:' .. id end

-- The consumer that holds the entry's lease, or nil when the entry is not pending at all.
local function owner_of(entry)
  local p = redis.call('XPENDING', STREAM, GROUP, entry, entry, 1)
  if p[1] == nil then return nil end
  return p[1][2]
end

local TERMINAL = { succeeded = true, canceled = true, dead = true }

-- Tells the waiting ingress replica; its stream is capped and expires with the replica.
local function reply(id, state, now)
  local to = redis.call('HGET', rkey(id), 'reply_to')
  if to and to ~= '' then
    redis.call('XADD', to, 'MAXLEN', '~', 10000, '*', 'id', id, 'state', state, 'time', now)
    redis.call('PEXPIRE', to, 3600000)
  end
end

local function finish(id, entry, state, now, result, err)
  local k = rkey(id)
  redis.call('HSET', k, 'state', state, 'finished_ms', now)
  if result and result ~= '' then redis.call('HSET', k, 'result', result) end
  if err and err ~= '' then redis.call('HSET', k, 'error', err) end
  redis.call('XACK', STREAM, GROUP, entry)
  if state == 'dead' then
    redis.call('XADD', P .. ':dead', '*', 'id', id, 'error', err or '', 'time', now)
  end
  reply(id, state, now)
end
