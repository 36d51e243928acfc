-- Deletes finished request records past their retention, oldest first, at most ARGV[3] of them.
--   KEYS[1] the finished index (of one partition on a Redis Cluster): a zset of finished request ids scored by finished_ms (written by
--           the request functions at every terminal transition)
--   ARGV[1] prefix (of the records and idempotency keys), ARGV[2] cutoff (ms: records finished
--   at or before it go), ARGV[3] limit
-- The record itself decides: one that is no longer terminal (a dead request retried) leaves the
-- index and rejoins it when it ends again; one that finished later than its score is re-scored.
-- The idempotency key goes with the record only while it still points to it; its data streams
-- (P:req:<id>:s:<name>, listed in its `streams` field) go with it.
-- Dead requests have their own retention (ARGV[4]: their cutoff, or -1 to keep them until
-- retried or deleted): one kept for good leaves the index (it rejoins if retried and finished
-- again); one kept for longer is re-scored to when it becomes due.
-- Returns {purged, examined}.
local P, cutoff, limit, dead_cutoff = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local index = KEYS[1]
-- A partition's index on a Redis Cluster carries its hash tag (`{p3}`); its records and
-- idempotency claims carry the same one (keys.rs, `requests`).
local PT = string.match(index, '{[^}]*}') or ''
local ids = redis.call('ZRANGEBYSCORE', index, '-inf', cutoff, 'LIMIT', 0, limit)
local purged = 0
for _, id in ipairs(ids) do
  local k = P .. KEY_RECORD .. PT .. id
  local v = redis.call('HMGET', k, 'state', 'finished_ms', 'idempotency_key', 'streams')
  local finished = tonumber(v[2])
  if not v[1] or not TERMINAL_STATES[v[1]] then
    redis.call('ZREM', index, id)
  elseif finished and finished > cutoff then
    redis.call('ZADD', index, finished, id)
  elseif v[1] == 'dead' and dead_cutoff < 0 then
    redis.call('ZREM', index, id)
  elseif v[1] == 'dead' and finished and finished > dead_cutoff then
    redis.call('ZADD', index, finished + (cutoff - dead_cutoff), id)
  else
    if v[4] and v[4] ~= '' then
      local ok, streams = pcall(cjson.decode, v[4])
      if ok and type(streams) == 'table' then
        for _, s in ipairs(streams) do
          if type(s) == 'table' and type(s.name) == 'string' then
            local base = k .. ':s:' .. s.name
            redis.call('DEL', base, base .. ':c', base .. ':i')
          end
        end
      end
    end
    redis.call('DEL', k)
    if v[3] and v[3] ~= '' then
      local idem = P .. KEY_IDEM .. PT .. v[3]
      if redis.call('GET', idem) == id then redis.call('DEL', idem) end
    end
    redis.call('ZREM', index, id)
    purged = purged + 1
  end
end
return { purged, #ids }
