-- fencelock: extend
-- Compare-and-PEXPIRE: resets the TTL of every key, but only when every key still holds
-- one of our values. It never deletes anything: a failed extension leaves a still-valid
-- lock alone. Several values are ours after in-process hand-offs: a node that missed a
-- hand-off still holds an earlier value of the same chain, and is renewed like the rest.
--
-- KEYS[1..n]  the resource keys
-- ARGV[1]     the new TTL in milliseconds
-- ARGV[2..m]  the values of this acquisition and of the hand-off chain that led to it
--
-- Returns     1 when every key was ours and was extended; 0 otherwise (nothing changed)
for i = 1, #KEYS do
  local current = redis.call('GET', KEYS[i])
  local ours = false
  if current then
    for j = 2, #ARGV do
      if current == ARGV[j] then
        ours = true
        break
      end
    end
  end
  if not ours then
    return 0
  end
end
for i = 1, #KEYS do
  redis.call('PEXPIRE', KEYS[i], ARGV[1])
end
return 1
