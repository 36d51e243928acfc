-- Stores outcomes, fenced by lease ownership: a consumer that lost the entry to another can
-- neither store a result nor ack. ARGV: prefix, stream, group, consumer, now, then per outcome:
-- entry, id, state ('succeeded' 'dead' 'canceled' terminal: stored, answered, acked — on a
-- cluster by the caller, after it answered; 'failed': a retry follows, nothing acked), result
-- JSON ('' none), error ('' none).
-- Returns 1 per stored outcome, 0 per refused one.
local consumer, now = ARGV[4], tonumber(ARGV[5])
local out = {}
for i = 6, #ARGV, 5 do
  local entry, id, state, result, err = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  if owner_of(entry) ~= consumer then
    out[#out + 1] = 0
  elseif state == 'failed' then
    redis.call('HSET', rkey(id), 'state', 'failed', 'error', err)
    out[#out + 1] = 1
  else
    finish(id, entry, state, now, result, err)
    out[#out + 1] = 1
  end
end
flush()
return answer(out)
