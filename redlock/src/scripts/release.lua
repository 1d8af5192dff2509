-- fencelock: release
-- Compare-and-delete: deletes a key only while it holds one of our values, so a late
-- release can never free a lock that has since passed to another owner. Several values
-- are ours after in-process hand-offs: a node that missed a hand-off still holds an
-- earlier value of the same chain.
--
-- KEYS[1..n]  the resource keys
-- ARGV[1..m]  the values of this acquisition and of the hand-off chain that led to it
--
-- Returns     the number of keys deleted (0 when none was ours any more)
local deleted = 0
for i = 1, #KEYS do
  local current = redis.call('GET', KEYS[i])
  if current then
    for j = 1, #ARGV do
      if current == ARGV[j] then
        deleted = deleted + redis.call('DEL', KEYS[i])
        break
      end
    end
  end
end
return deleted
