-- fencelock: acquire
-- Sets every key to the lock value with a TTL, all of them or none of them. A key that
-- exists (held by anyone, including a node-redlock or redsync client) refuses the whole
-- acquisition on this node, so a multi-resource lock is atomic per node.
--
-- KEYS[1..n]  the resource keys (the resource names as given: the interop convention)
-- ARGV[1]     the lock value: 128 random bits, unique to this acquisition
-- ARGV[2]     the TTL in milliseconds
--
-- Returns     1 when every key was set; 0 when any key already existed (nothing set)
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    return 0
  end
end
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], ARGV[1], 'PX', ARGV[2])
end
return 1
