-- include: lib_time
-- include: breaker_lib
-- breaker_allow: admit up to n calls to the scraper.
-- KEYS[1] breaker hash, KEYS[2] trials sorted set
-- ARGV[1] n, ARGV[2] JSON cfg {failures, recovery_ms, successes, half_open_max, trial_ttl_ms}
-- Reply: JSON {admitted, trials = [ids], retry_after_ms, breaker = view}
local now = now_ms()
local cfg = cjson.decode(ARGV[2])
local admitted, trials, retry_ms, b = breaker_allow(KEYS[1], KEYS[2], tonumber(ARGV[1]), cfg, now)
local view = breaker_view(KEYS[2], b, cfg, now)
return cjson.encode({admitted = admitted, trials = trials, retry_after_ms = retry_ms, breaker = view})
