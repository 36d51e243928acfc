-- The entries of a tree's change feed after the id `after`, if the feed still holds everything
-- after it. ARGV: prefix, root, after. Returns { 'ok', entries } or { 'gap' } when entries after
-- `after` may have been trimmed (or the feed was dropped): the caller needs a fresh snapshot.
-- `after` is either an entry id of the feed (a live event id) or '0-0' (a snapshot taken before
-- the feed existed), which resumes only from a feed that never lost an entry.
local fk, after = feed_key(ARGV[2]), ARGV[3]
if redis.call('EXISTS', fk) == 0 then
  if after == '0-0' then return { 'ok', {} } end
  return { 'gap' }
end
if after == '0-0' then
  local info = redis.call('XINFO', 'STREAM', fk)
  local added, length
  for i = 1, #info, 2 do
    if info[i] == 'entries-added' then added = info[i + 1] elseif info[i] == 'length' then length = info[i + 1] end
  end
  if added ~= length then return { 'gap' } end
  return { 'ok', redis.call('XRANGE', fk, '-', '+') }
end
if #redis.call('XRANGE', fk, after, after) == 0 then return { 'gap' } end
return { 'ok', redis.call('XRANGE', fk, '(' .. after, '+') }
