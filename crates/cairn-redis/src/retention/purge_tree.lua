-- Guard in front of the progress store's delete (progress/delete.lua follows it in the same
-- function; same ARGV: prefix, key, time_ms, then ARGV[4] the cutoff): the tree goes only if its root is a root in P:proots last updated at or
-- before the cutoff and its status is terminal, checked in the same script that deletes, so an
-- update arriving meanwhile keeps the tree. Returns -1 when the tree stays. The tree's change
-- feed goes with it (watchers are told through P:pfeed). An upload's tree (`_uploads.<id>`)
-- whose upload is gone (expired, deleted or used by a request) counts as finished whatever its
-- status: an abandoned upload's node stays `running` for ever otherwise.
-- With TAGGED (a cluster) the index is in another slot: the root node's own update time, which
-- every write to the tree moves, stands for its score (the caller found the root in the index);
-- so is an upload's key, which the caller looks for: ARGV[5] '1' when the upload is gone.
do
  local root = ARGV[2]
  local score
  if TAGGED then
    local state = redis.call('HGET', nkey(root), '_s')
    if not state then
      -- a stale index entry without its tree
      unindex_root(root)
      return deferred(0)
    end
    score = decode(state)
  else
    score = tonumber(redis.call('ZSCORE', P .. KEY_ROOTS, root))
  end
  local status = redis.call('HGET', nkey(root), 'status')
  if score and redis.call('EXISTS', nkey(root)) == 0 then
    -- a stale index entry without its tree
    unindex_root(root)
    return deferred(0)
  end
  local abandoned = false
  if string.sub(root, 1, 9) == '_uploads.' then
    if TAGGED then
      -- The upload's key is in its partition's slot: the caller looked (ARGV[5] '1': gone).
      abandoned = ARGV[5] == '1'
    else
      abandoned = redis.call('EXISTS', P .. ':upload:' .. string.sub(root, 10)) == 0
    end
  end
  local finished = abandoned or (status and TERMINAL[status])
  if parent_of(root) or not score or score > tonumber(ARGV[4]) or not finished then
    return deferred(-1)
  end
  FEED_DROP = true
end
