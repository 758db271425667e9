-- include: lib_time
-- include: breaker_lib
-- breaker_record: record outcomes of admitted calls, in order, as one atomic step.
-- KEYS[1] breaker hash, KEYS[2] trials sorted set
-- ARGV[1] JSON cfg, ARGV[2] JSON [[kind, trial_id], ...]  kind: 's' success, 'f' failure, 'n' neutral
-- Reply: JSON breaker view after
local now = now_ms()
local cfg = cjson.decode(ARGV[1])
local b = breaker_record(KEYS[1], KEYS[2], cjson.decode(ARGV[2]), cfg, now)
return cjson.encode(breaker_view(KEYS[2], b, cfg, now))
