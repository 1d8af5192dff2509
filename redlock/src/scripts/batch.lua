-- The dispatcher of the batch script; `scripts` (the other scripts as functions, numbered
-- as in `scripts::all()`) is defined above it. See `scripts::BATCH` for the layout.
--
-- KEYS            every operation's keys, in order
-- ARGV[1]         the number of operations
-- ARGV[2..]       per operation: script number, key count, argument count, the arguments
--
-- Returns  one reply per operation: its script's integer, or the error it raised as a string
local out = {}
-- One KEYS and one ARGV table for every operation, refilled each time: a fresh pair per
-- operation was a quarter of the batch's cost. No script keeps or changes its tables.
local keys, argv = {}, {}
local k, a = 1, 2
for op = 1, tonumber(ARGV[1]) do
  local number = tonumber(ARGV[a])
  local f = scripts[number]
  local nk, na = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  a = a + 3
  -- Each table stays a proper sequence, so `#KEYS` and `#ARGV` are this operation's counts.
  for i = 1, nk do
    keys[i] = KEYS[k + i - 1]
  end
  for i = nk + 1, #keys do
    keys[i] = nil
  end
  for i = 1, na do
    argv[i] = ARGV[a + i - 1]
  end
  for i = na + 1, #argv do
    argv[i] = nil
  end
  k = k + nk
  a = a + na
  local ok, r = pcall(f, keys, argv)
  if number > 5 then
    -- Seeding, init, verify and genesis may change the mark and the floor behind the
    -- copies the fencing scripts keep (see the prelude).
    mark_high, mark_floor = nil, nil
  end
  if ok then
    out[op] = r
  elseif type(r) == 'table' and r.err then
    out[op] = r.err
  else
    out[op] = tostring(r)
  end
end
return out
