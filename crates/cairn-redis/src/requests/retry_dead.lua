-- Runs a dead request again: fresh attempts, a new stream entry. ARGV: prefix, stream, group,
-- id, now. Returns {outcome, entry}: 'missing', 'not_dead', or 'queued'.
local id = ARGV[4]
local k = rkey(id)
local state = redis.call('HGET', k, 'state')
if not state then return answer({ 'missing', '' }) end
if state ~= 'dead' then return answer({ 'not_dead', state }) end
redis.call('HSET', k, 'state', 'queued', 'attempts', 0, 'cancel', '0')
redis.call('HDEL', k, 'finished_ms', 'error', 'result', 'owner')
local entry = redis.call('XADD', STREAM, '*', 'id', id)
redis.call('HSET', k, 'entry_id', entry)
return answer({ 'queued', entry })
