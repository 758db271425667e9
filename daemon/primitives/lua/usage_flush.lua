-- usage_flush: add this process's Redis command counts to the day's ledger.
-- KEYS[1] usage hash of the day
-- ARGV[1] ttl seconds, then pairs ARGV[2k] purpose, ARGV[2k+1] count
-- Reply: 1
for i = 2, #ARGV, 2 do
    redis.call('HINCRBY', KEYS[1], ARGV[i], tonumber(ARGV[i + 1]))
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
return 1
