-- fencelock: fence write-back
-- Raises what the node knows of each resource (see `fence_known` in the prelude) to the
-- last token the acquisition may hand out (its own plus the ones reserved with it), while
-- the node still holds our lock. After this has run on a quorum, any later acquisition's
-- quorum meets a node that knows at least that, so its token is larger. A counter that is
-- gone stands for the high-water mark, which may be above the token: it is raised to the
-- larger of the two, never set to a token below what the node knew.
--
-- KEYS[1..n]      the resource keys
-- KEYS[n+1..2n]   the resources' fence counter keys
-- KEYS[2n+1]      the node's high-water mark
-- KEYS[2n+2]      the node's floor
-- ARGV[1]         the lock value of this acquisition
-- ARGV[2]         the fencing token plus the number of tokens reserved after it
-- ARGV[3]         the fence window in milliseconds
--
-- Returns  1 when every key holds our value and the node knows at least the token of each;
--          0 when a key no longer holds our value (nothing changed)
local n = (#KEYS - 2) / 2
for i = 1, n do
  if redis.call('GET', KEYS[i]) ~= ARGV[1] then
    return 0
  end
end
local known, high = fence_known(KEYS, n)
fence_store(KEYS, n, math.max(known, tonumber(ARGV[2])), high, ARGV[3])
return 1
