-- fencelock: hand-off
-- Passes a lock from one holder in a process to the next without letting go of it: swaps
-- our previous value for a fresh one and resets the TTL, all keys or none. One round
-- instead of a release followed by an acquire.
--
-- KEYS[1..n]  the resource keys
-- ARGV[1]     the value of this acquisition: 128 random bits, unique to it
-- ARGV[2]     the TTL in milliseconds
-- ARGV[3..m]  the values of the hand-off chain so far, all held by this process (a node
--             that missed a hand-off still holds an earlier one)
--
-- Returns     1 when every key held a value of the chain and now holds the new one;
--             0 otherwise (nothing changed)
for i = 1, #KEYS do
  local current = redis.call('GET', KEYS[i])
  local ours = false
  for j = 3, #ARGV do
    if current == ARGV[j] then
      ours = true
      break
    end
  end
  if not ours then
    return 0
  end
end
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], ARGV[1], 'PX', ARGV[2])
end
return 1
