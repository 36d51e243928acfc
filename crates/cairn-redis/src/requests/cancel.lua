-- Requests cancellation. ARGV: prefix, stream, group, id, now. Returns {outcome, state}:
-- 'missing'; 'terminal' (nothing to do); 'canceled' (it had not started: it never will);
-- 'signaled' (running: its processor sees the flag at its next heartbeat).
local id, now = ARGV[4], tonumber(ARGV[5])
local k = rkey(id)
local state = redis.call('HGET', k, 'state')
if not state then return answer({ 'missing', '' }) end
if TERMINAL_STATES[state] then return answer({ 'terminal', state }) end
redis.call('HSET', k, 'cancel', '1')
if state == 'queued' then
  -- The entry stays in the stream; whichever processor receives it acks it without running it.
  redis.call('HSET', k, 'state', 'canceled', 'finished_ms', now, 'error', 'canceled before it ran')
  reply(id, 'canceled', now)
  flush()
  return answer({ 'canceled', 'canceled' })
end
return answer({ 'signaled', state })
