-- fencelock: release
-- Compare-and-delete: deletes a key only while it still holds our value, so a late
-- release can never free a lock that has since passed to another owner.
--
-- KEYS[1..n]  the resource keys
-- ARGV[1]     the lock value of this acquisition
--
-- Returns     the number of keys deleted (0 when none was ours any more)
local deleted = 0
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    deleted = deleted + redis.call('DEL', KEYS[i])
  end
end
return deleted
