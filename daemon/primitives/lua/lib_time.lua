-- lib_time: the current time in milliseconds from the Redis server, so every host agrees.
if redis.replicate_commands then pcall(redis.replicate_commands) end

local function now_ms()
    local t = redis.call('TIME')
    return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
