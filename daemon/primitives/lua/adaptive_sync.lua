-- include: lib_time
-- adaptive_sync: the planner's intervals and priorities into Redis, in chunks of one generation; the
-- final chunk drops sections no longer watched and computes the schedule's figures for every daemon.
-- A new section is first due at its last check (from Postgres) + its interval, or, never checked, after
-- its jitter (spread over its interval, so a cold start is not one burst). A section whose interval
-- changed is due at its last take + the new interval (never before last + minimum: intervals are >= it).
--
-- KEYS[1] due  KEYS[2] interval  KEYS[3] prio  KEYS[4] last  KEYS[5] gen  KEYS[6] scrapes  KEYS[7] report
-- KEYS[8] daemons (hash consumer -> last sync ms)
-- ARGV[1] JSON {gen, final, max_ms, late_ms, consumer, daemon_ttl_ms,
--               sections = [[member, interval_ms, prio, last_checked_ms (0 unknown), jitter_ms]], report = {}}
-- Reply: JSON {now_ms, watched, covered, scrapes_last_hour, daemons, removed}
local now = now_ms()
local a = cjson.decode(ARGV[1])
for _, s in ipairs(a.sections) do
    local m, interval, prio, checked, jitter = s[1], s[2], s[3], s[4], s[5]
    local old = redis.call('HGET', KEYS[2], m)
    if not redis.call('ZSCORE', KEYS[1], m) then
        if checked > 0 then
            redis.call('HSET', KEYS[4], m, checked)
            redis.call('ZADD', KEYS[1], checked + interval, m)
        else
            redis.call('HSET', KEYS[4], m, -now)
            redis.call('ZADD', KEYS[1], now + jitter, m)
        end
    elseif old and tonumber(old) ~= interval then
        local last = tonumber(redis.call('HGET', KEYS[4], m) or '0') or 0
        if last > 0 then
            redis.call('ZADD', KEYS[1], last + interval + a.late_ms, m)
        end
    end
    redis.call('HSET', KEYS[2], m, interval)
    redis.call('HSET', KEYS[3], m, prio)
    redis.call('HSET', KEYS[5], m, a.gen)
end
if not a.final then
    return cjson.encode({now_ms = now})
end
local removed = 0
local gens = redis.call('HGETALL', KEYS[5])
for i = 1, #gens, 2 do
    if gens[i + 1] ~= tostring(a.gen) then
        local m = gens[i]
        redis.call('ZREM', KEYS[1], m)
        redis.call('HDEL', KEYS[2], m)
        redis.call('HDEL', KEYS[3], m)
        redis.call('HDEL', KEYS[4], m)
        redis.call('HDEL', KEYS[5], m)
        removed = removed + 1
    end
end
local watched = redis.call('ZCARD', KEYS[1])
local covered = 0
local lasts = redis.call('HGETALL', KEYS[4])
for i = 2, #lasts, 2 do
    local v = tonumber(lasts[i]) or 0
    if math.abs(v) >= now - a.max_ms - a.late_ms then covered = covered + 1 end
end
local scrapes, this_minute = 0, math.floor(now / 60000)
local minutes = redis.call('HGETALL', KEYS[6])
for i = 1, #minutes, 2 do
    local minute = tonumber(minutes[i])
    if minute < this_minute - 120 then
        redis.call('HDEL', KEYS[6], minutes[i])
    elseif minute > this_minute - 60 and minute <= this_minute then
        scrapes = scrapes + tonumber(minutes[i + 1])
    end
end
redis.call('HSET', KEYS[8], a.consumer, now)
local daemons = 0
local seen = redis.call('HGETALL', KEYS[8])
for i = 1, #seen, 2 do
    if tonumber(seen[i + 1]) >= now - a.daemon_ttl_ms then
        daemons = daemons + 1
    else
        redis.call('HDEL', KEYS[8], seen[i])
    end
end
local figures = {now_ms = now, watched = watched, covered = covered,
                 scrapes_last_hour = scrapes, daemons = daemons, removed = removed}
local report = a.report
for k, v in pairs(figures) do report[k] = v end
redis.call('HSET', KEYS[7], 'json', cjson.encode(report))
return cjson.encode(figures)
