-- include: lib_time
-- include: breaker_lib
-- breaker_status: the breaker as it is now (OPEN past its recovery reads HALF_OPEN); changes nothing.
-- KEYS[1] breaker hash, KEYS[2] trials sorted set
-- ARGV[1] JSON cfg
-- Reply: JSON breaker view
local now = now_ms()
local cfg = cjson.decode(ARGV[1])
local b = breaker_load(KEYS[1])
breaker_settle_time(b, cfg, now)
return cjson.encode(breaker_view(KEYS[2], b, cfg, now))
