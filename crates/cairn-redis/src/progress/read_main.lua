-- ARGV: prefix, key, depth, limit, after ('' for the first page).
budget = READ_BUDGET
return read_node(ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5])
