-- breaker_lib: the circuit breaker's state machine, shared by breaker_* and queue_cycle.
--
-- State lives in a hash (KB): state CLOSED|OPEN|HALF_OPEN, failures (consecutive), successes (in
-- HALF_OPEN), last_failure_ms, last_change_ms, seq (trial id counter). Half-open trials in flight live in
-- a sorted set (KT): trial id -> expiry ms, so a trial whose process died frees its slot when it expires.
--
-- cfg = {failures = F, recovery_ms = R, successes = S, half_open_max = H, trial_ttl_ms = T}

local function breaker_load(kb)
    local v = redis.call('HMGET', kb, 'state', 'failures', 'successes', 'last_failure_ms', 'last_change_ms')
    return {
        state = v[1] or 'CLOSED',
        failures = tonumber(v[2]) or 0,
        successes = tonumber(v[3]) or 0,
        last_failure_ms = tonumber(v[4]) or 0,
        last_change_ms = tonumber(v[5]) or 0,
        stored_state = v[1] or 'CLOSED',  -- what the hash holds, so a lazy transition is saved once
    }
end

local function breaker_save(kb, b)
    b.stored_state = b.state
    redis.call('HSET', kb, 'state', b.state, 'failures', b.failures, 'successes', b.successes,
        'last_failure_ms', b.last_failure_ms, 'last_change_ms', b.last_change_ms)
end

local function breaker_set_state(b, state, now)
    if b.state ~= state then
        b.state = state
        b.last_change_ms = now
        b.successes = 0
    end
end

-- OPEN becomes HALF_OPEN once the recovery time has passed since the last failure (lazily, on any call).
local function breaker_settle_time(b, cfg, now)
    if b.state == 'OPEN' and now - b.last_failure_ms >= cfg.recovery_ms then
        -- The moment it became half-open is when recovery ended, whoever looks and whenever.
        breaker_set_state(b, 'HALF_OPEN', b.last_failure_ms + cfg.recovery_ms)
    end
end

local function breaker_wait_ms(b, cfg, now)
    if b.state == 'OPEN' then
        return math.max(0, cfg.recovery_ms - (now - b.last_failure_ms))
    end
    return 0
end

-- Apply one outcome: 's' success, 'f' failure, anything else neutral (frees a trial slot only).
local function breaker_apply(b, kind, cfg, now)
    breaker_settle_time(b, cfg, now)
    if kind == 's' then
        b.failures = 0
        if b.state == 'HALF_OPEN' then
            b.successes = b.successes + 1
            if b.successes >= cfg.successes then
                breaker_set_state(b, 'CLOSED', now)
            end
        end
    elseif kind == 'f' then
        b.failures = b.failures + 1
        b.last_failure_ms = now
        if b.state == 'HALF_OPEN' or (b.state == 'CLOSED' and b.failures >= cfg.failures) then
            breaker_set_state(b, 'OPEN', now)
        end
    end
end

local function breaker_view(kt, b, cfg, now)
    local in_flight = redis.call('ZCOUNT', kt, now + 1, '+inf')
    return {
        state = b.state,
        failures = b.failures,
        successes = b.successes,
        last_failure_ms = b.last_failure_ms,
        last_change_ms = b.last_change_ms,
        in_flight = in_flight,
        retry_after_ms = breaker_wait_ms(b, cfg, now),
        now_ms = now,
    }
end

-- Record outcomes in order: outcomes is a list of {kind, trial_id}; trial_id '' for non-trial calls.
local function breaker_record(kb, kt, outcomes, cfg, now)
    local b = breaker_load(kb)
    local before = b.state .. ':' .. b.failures .. ':' .. b.successes .. ':' .. b.last_failure_ms .. ':' .. b.last_change_ms
    local freed = {}
    for _, o in ipairs(outcomes) do
        if o[2] ~= nil and o[2] ~= '' then freed[#freed + 1] = o[2] end
        breaker_apply(b, o[1], cfg, now)
    end
    -- One ZREM for every trial the batch frees, and no write when the outcomes changed nothing (a run of
    -- successes while CLOSED): each command a script runs is billed.
    if #freed > 0 then redis.call('ZREM', kt, unpack(freed)) end
    local after = b.state .. ':' .. b.failures .. ':' .. b.successes .. ':' .. b.last_failure_ms .. ':' .. b.last_change_ms
    if after ~= before then breaker_save(kb, b) end
    return b
end

-- Admit up to n calls given the breaker already loaded (and perhaps changed by outcomes in this call).
-- Returns admitted count, the trial ids (HALF_OPEN only), the wait, and the breaker after.
local function breaker_allow_loaded(kb, kt, b, n, cfg, now)
    local before = b.stored_state or b.state
    breaker_settle_time(b, cfg, now)
    local admitted, trials, retry_ms = 0, {}, 0
    if b.state == 'CLOSED' then
        admitted = n
    elseif b.state == 'OPEN' then
        retry_ms = breaker_wait_ms(b, cfg, now)
    else
        redis.call('ZREMRANGEBYSCORE', kt, '-inf', now)
        local in_flight = redis.call('ZCARD', kt)
        admitted = math.max(0, math.min(n, cfg.half_open_max - in_flight))
        if admitted > 0 then
            -- One HINCRBY and one ZADD for all the trials (each command a script runs is billed).
            local last = redis.call('HINCRBY', kb, 'seq', admitted)
            local members = {}
            for id = last - admitted + 1, last do
                members[#members + 1] = now + cfg.trial_ttl_ms
                members[#members + 1] = id
                trials[#trials + 1] = tostring(id)
            end
            redis.call('ZADD', kt, unpack(members))
        end
        if admitted < n then
            -- Every trial slot is taken: look again when the earliest could have freed, at most in 5 s.
            local first = redis.call('ZRANGE', kt, 0, 0, 'WITHSCORES')
            retry_ms = 5000
            if first[2] then retry_ms = math.max(100, math.min(retry_ms, tonumber(first[2]) - now)) end
        end
    end
    if b.state ~= before then breaker_save(kb, b) end
    return admitted, trials, retry_ms, b
end

-- Admit up to n calls. Returns admitted count, the trial ids (HALF_OPEN only) and the breaker after.
local function breaker_allow(kb, kt, n, cfg, now)
    return breaker_allow_loaded(kb, kt, breaker_load(kb), n, cfg, now)
end
