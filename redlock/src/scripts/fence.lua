-- fencelock: fence write-back
-- Raises each resource's fence counter to the last token the acquisition may hand out
-- (its own plus the ones reserved with it), while the node still holds our lock. After
-- this has run on a quorum, any later acquisition's quorum meets a node whose counter is
-- at least that, so its token is larger.
--
-- KEYS[1..n]      the resource keys
-- KEYS[n+1..2n]   the resources' fence counter keys
-- ARGV[1]         the lock value of this acquisition
-- ARGV[2]         the fencing token plus the number of tokens reserved after it
--
-- Returns  1 when every key holds our value and every counter is at least the token;
--          0 when a key no longer holds our value (nothing changed)
local n = #KEYS / 2
for i = 1, n do
  if redis.call('GET', KEYS[i]) ~= ARGV[1] then
    return 0
  end
end
local token = tonumber(ARGV[2])
for i = n + 1, 2 * n do
  if tonumber(redis.call('GET', KEYS[i]) or '0') < token then
    redis.call('SET', KEYS[i], token)
  end
end
return 1
