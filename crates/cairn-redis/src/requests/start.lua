-- Starts attempts. ARGV: prefix, stream, group, consumer, now, then (entry, id) pairs.
-- Per entry returns {entry, verdict, attempts, error, record}: 'run' (attempts incremented, state
-- running; `record` is the request's hash as HGETALL gives it, empty for the other verdicts),
-- 'skip' (terminal or unknown: acked; on a cluster a terminal one is told again, `retell`),
-- 'canceled', 'dead' (no attempts left: dead-lettered), or 'lost' (the lease belongs to another
-- consumer).
local consumer, now = ARGV[4], tonumber(ARGV[5])
local out = {}
for i = 6, #ARGV, 2 do
  local entry, id = ARGV[i], ARGV[i + 1]
  local k = rkey(id)
  local v = redis.call('HMGET', k, 'state', 'attempts', 'max_attempts', 'cancel', 'started_ms')
  local verdict, attempts, err, record = 'run', tonumber(v[2]) or 0, '', {}
  if owner_of(entry) ~= consumer then
    verdict = 'lost'
  elseif v[1] and TERMINAL_STATES[v[1]] and TAGGED then
    retell(id, entry, v[1], now)
    verdict = 'skip'
  elseif not v[1] or TERMINAL_STATES[v[1]] then
    redis.call('XACK', STREAM, GROUP, entry)
    verdict = 'skip'
  elseif v[4] == '1' then
    finish(id, entry, 'canceled', now, '', 'canceled before it ran')
    verdict = 'canceled'
  elseif attempts >= (tonumber(v[3]) or 1) then
    err = redis.call('HGET', k, 'error') or ''
    if v[1] == 'running' then err = 'attempt ' .. attempts .. ' never finished (its processor was lost)' end
    finish(id, entry, 'dead', now, '', err)
    verdict = 'dead'
  else
    attempts = attempts + 1
    -- started_ms keeps the first attempt's start
    redis.call('HSET', k, 'state', 'running', 'attempts', attempts, 'owner', consumer, 'heartbeat_ms', now,
      'started_ms', v[5] or now)
    record = redis.call('HGETALL', k)
  end
  out[#out + 1] = { entry, verdict, attempts, err, record }
end
flush()
return answer(out)
