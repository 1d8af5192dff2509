-- fencelock: extend
-- Compare-and-PEXPIRE: resets the TTL of every key, but only when every key still holds
-- our value. It never deletes anything: a failed extension leaves a still-valid lock alone.
--
-- KEYS[1..n]  the resource keys
-- ARGV[1]     the lock value of this acquisition
-- ARGV[2]     the new TTL in milliseconds
--
-- Returns     1 when every key was ours and was extended; 0 otherwise (nothing changed)
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) ~= ARGV[1] then
    return 0
  end
end
for i = 1, #KEYS do
  redis.call('PEXPIRE', KEYS[i], ARGV[2])
end
return 1
