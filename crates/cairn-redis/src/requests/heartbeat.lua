-- Renews leases. ARGV: prefix, stream, group, consumer, now, then (entry, id, progress) triples;
-- progress is the handler's own progress the heartbeat carries ('' none), kept in the record.
-- Per entry returns 'lost', 'cancel' (renewed, cancellation requested) or 'ok' (renewed).
local consumer, now = ARGV[4], ARGV[5]
local out = {}
for i = 6, #ARGV, 3 do
  local entry, id, progress = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if owner_of(entry) ~= consumer then
    out[#out + 1] = 'lost'
  else
    -- JUSTID resets the idle time without counting a delivery.
    redis.call('XCLAIM', STREAM, GROUP, consumer, 0, entry, 'JUSTID')
    if progress ~= '' then
      redis.call('HSET', rkey(id), 'heartbeat_ms', now, 'heartbeat_progress', progress)
    else
      redis.call('HSET', rkey(id), 'heartbeat_ms', now)
    end
    if redis.call('HGET', rkey(id), 'cancel') == '1' then out[#out + 1] = 'cancel' else out[#out + 1] = 'ok' end
  end
end
return answer(out)
