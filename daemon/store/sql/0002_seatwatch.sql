-- What seatwatch owns: its per-term detection state, the transactional outbox, and the functions the
-- pipeline calls. Nothing here touches the web app's objects except through the functions' DML.

-- Detection state keyed by (term, class_nbr): the legacy class_states is unique on class_nbr alone, so one
-- class number watched in two terms would flap there. Every observation is mirrored into class_states too.
CREATE TABLE IF NOT EXISTS seatwatch_section_states (
    term               text NOT NULL,
    class_nbr          text NOT NULL,
    subject            text NOT NULL,
    catalog_nbr        text NOT NULL,
    title              text,
    instructor_name    text,
    seats_available    integer NOT NULL,
    seats_capacity     integer NOT NULL,
    non_reserved_seats integer,
    location           text,
    meeting_times      text,
    last_checked_at    timestamptz NOT NULL DEFAULT now(),
    last_changed_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (term, class_nbr)
);

-- A batch is formed once, recorded here with its key before its first request, and always resent as the
-- same rows under the same Idempotency-Key.
CREATE TABLE IF NOT EXISTS seatwatch_outbox_batches (
    key             text PRIMARY KEY,
    created_at      timestamptz NOT NULL DEFAULT now(),
    status          text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'failed')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    leased_until    timestamptz,
    leased_by       text,
    ambiguous       boolean NOT NULL DEFAULT false,  -- an attempt may have delivered (no answer, 5xx)
    last_error      text,
    sent_at         timestamptz
);
CREATE INDEX IF NOT EXISTS seatwatch_outbox_batches_due
    ON seatwatch_outbox_batches (next_attempt_at) WHERE status = 'pending';

-- One row per email owed. payload is the exact JSON object posted to Resend for it (from, to, subject,
-- html, text, headers), rendered once in the transaction that claimed the notification.
CREATE TABLE IF NOT EXISTS seatwatch_outbox (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at        timestamptz NOT NULL DEFAULT now(),
    class_watch_id    uuid,
    user_id           uuid,
    notification_type text NOT NULL,
    term              text NOT NULL,
    class_nbr         text NOT NULL,
    payload           text NOT NULL,
    unsubscribe_token text NOT NULL,
    status            text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'failed')),
    batch_key         text REFERENCES seatwatch_outbox_batches (key),
    solo              boolean NOT NULL DEFAULT false,
    provider_id       text,
    last_error        text,
    sent_at           timestamptz
);
CREATE INDEX IF NOT EXISTS seatwatch_outbox_unbatched
    ON seatwatch_outbox (id) WHERE status = 'pending' AND batch_key IS NULL;
CREATE INDEX IF NOT EXISTS seatwatch_outbox_batch ON seatwatch_outbox (batch_key);
CREATE INDEX IF NOT EXISTS seatwatch_outbox_sent_at ON seatwatch_outbox (sent_at) WHERE status = 'sent';
-- Health and status count the rows still owed or failed; sent rows (30 days of them) stay out of that scan.
CREATE INDEX IF NOT EXISTS seatwatch_outbox_open
    ON seatwatch_outbox (status, created_at) WHERE status IN ('pending', 'failed');

-- These tables hold email addresses and unsubscribe tokens: nobody but their owner (the daemon's role)
-- may read them, even where PostgREST exposes the public schema (Supabase). Owners bypass RLS.
ALTER TABLE seatwatch_section_states ENABLE ROW LEVEL SECURITY;
ALTER TABLE seatwatch_outbox_batches ENABLE ROW LEVEL SECURITY;
ALTER TABLE seatwatch_outbox ENABLE ROW LEVEL SECURITY;


-- Sections of one tick: distinct (term, class_nbr) of every watch, by parity of the class number's last
-- digit. A class number ending in a non-digit counts as even, so it is still checked once an hour (and a
-- scraper that rejects it dead-letters it visibly) instead of never.
CREATE FUNCTION seatwatch_sections_to_check(p_group text)
RETURNS TABLE (term text, class_nbr text)
LANGUAGE plpgsql STABLE SET search_path = public AS $$
#variable_conflict use_column
BEGIN
    IF p_group IS NULL OR p_group NOT IN ('even', 'odd', 'all') THEN
        RAISE EXCEPTION 'group must be even, odd or all, got %', p_group;
    END IF;
    RETURN QUERY
        SELECT DISTINCT w.term, w.class_nbr
        FROM class_watches w
        WHERE p_group = 'all'
           OR (CASE WHEN right(w.class_nbr, 1) ~ '^[0-9]$' THEN right(w.class_nbr, 1)::int % 2 ELSE 0 END)
              = (CASE p_group WHEN 'even' THEN 0 ELSE 1 END)
        ORDER BY 1, 2;
END
$$;


-- Record one observation and return the state it replaces, holding the section's lock until commit.
-- The previous state is seatwatch's own row for (term, class_nbr); failing that, the legacy class_states
-- row of the same term (the first check after cutover); failing that, none (a first observation).
CREATE FUNCTION seatwatch_observe(
    p_term text, p_class_nbr text, p_subject text, p_catalog_nbr text, p_title text, p_instructor text,
    p_seats_available integer, p_seats_capacity integer, p_non_reserved_seats integer,
    p_location text, p_meeting_times text
)
RETURNS TABLE (prev_source text, prev_instructor text, prev_seats_available integer,
               prev_non_reserved_seats integer)
LANGUAGE plpgsql SET search_path = public AS $$
#variable_conflict use_column
DECLARE
    prev record;
    source text;
BEGIN
    -- Serialises checks of one section, even its very first one when there is no row to lock yet.
    PERFORM pg_advisory_xact_lock(hashtextextended('seatwatch:' || p_term || ':' || p_class_nbr, 0));

    SELECT s.instructor_name, s.seats_available, s.non_reserved_seats INTO prev
    FROM seatwatch_section_states s
    WHERE s.term = p_term AND s.class_nbr = p_class_nbr
    FOR UPDATE;
    IF FOUND THEN
        source := 'seatwatch';
    ELSE
        SELECT c.instructor_name, c.seats_available, c.non_reserved_seats INTO prev
        FROM class_states c
        WHERE c.class_nbr = p_class_nbr AND c.term = p_term;
        IF FOUND THEN
            source := 'class_states';
        END IF;
    END IF;

    INSERT INTO seatwatch_section_states AS s (
        term, class_nbr, subject, catalog_nbr, title, instructor_name, seats_available, seats_capacity,
        non_reserved_seats, location, meeting_times, last_checked_at, last_changed_at
    ) VALUES (
        p_term, p_class_nbr, p_subject, p_catalog_nbr, p_title, p_instructor, p_seats_available,
        p_seats_capacity, p_non_reserved_seats, p_location, p_meeting_times, now(), now()
    )
    ON CONFLICT (term, class_nbr) DO UPDATE SET
        subject = EXCLUDED.subject,
        catalog_nbr = EXCLUDED.catalog_nbr,
        title = EXCLUDED.title,
        instructor_name = EXCLUDED.instructor_name,
        seats_available = EXCLUDED.seats_available,
        seats_capacity = EXCLUDED.seats_capacity,
        non_reserved_seats = EXCLUDED.non_reserved_seats,
        location = EXCLUDED.location,
        meeting_times = EXCLUDED.meeting_times,
        last_checked_at = now(),
        last_changed_at = CASE
            WHEN s.seats_available IS DISTINCT FROM EXCLUDED.seats_available
              OR s.non_reserved_seats IS DISTINCT FROM EXCLUDED.non_reserved_seats
              OR s.instructor_name IS DISTINCT FROM EXCLUDED.instructor_name
            THEN now() ELSE s.last_changed_at END;

    -- The mirror for the web app's dashboard and Realtime: latest observation wins; its trigger keeps
    -- last_changed_at and last_checked_at.
    INSERT INTO class_states AS c (
        id, term, subject, catalog_nbr, class_nbr, title, instructor_name, seats_available, seats_capacity,
        non_reserved_seats, location, meeting_times, last_checked_at
    ) VALUES (
        gen_random_uuid(), p_term, p_subject, p_catalog_nbr, p_class_nbr, p_title, p_instructor,
        p_seats_available, p_seats_capacity, p_non_reserved_seats, p_location, p_meeting_times, now()
    )
    ON CONFLICT (class_nbr) DO UPDATE SET
        term = EXCLUDED.term,
        subject = EXCLUDED.subject,
        catalog_nbr = EXCLUDED.catalog_nbr,
        title = EXCLUDED.title,
        instructor_name = EXCLUDED.instructor_name,
        seats_available = EXCLUDED.seats_available,
        seats_capacity = EXCLUDED.seats_capacity,
        non_reserved_seats = EXCLUDED.non_reserved_seats,
        location = EXCLUDED.location,
        meeting_times = EXCLUDED.meeting_times,
        last_checked_at = now();

    IF source IS NULL THEN
        RETURN QUERY SELECT NULL::text, NULL::text, NULL::integer, NULL::integer;
    ELSE
        RETURN QUERY SELECT source, prev.instructor_name::text, prev.seats_available::integer,
                            prev.non_reserved_seats::integer;
    END IF;
END
$$;


-- Reset and claim notifications for one section, returning the claims this call made (one email each).
-- Watchers are matched on term as well as class_nbr, without users who turned notifications off, bounced,
-- complained or are disabled. A claim whose expires_at has passed can be claimed again (the legacy
-- try_record_notification returned false forever once a row existed).
CREATE FUNCTION seatwatch_claim(
    p_term text, p_class_nbr text, p_reset_seat boolean, p_types text[]
)
RETURNS TABLE (watch_id uuid, user_id uuid, email text, notification_type text)
LANGUAGE plpgsql SET search_path = public AS $$
#variable_conflict use_column
BEGIN
    IF p_reset_seat THEN
        DELETE FROM notifications_sent ns
        USING class_watches w
        WHERE ns.class_watch_id = w.id
          AND w.term = p_term AND w.class_nbr = p_class_nbr
          AND ns.notification_type = 'seat_available';
    END IF;

    IF cardinality(p_types) = 0 THEN
        RETURN;
    END IF;

    RETURN QUERY
    WITH eligible AS (
        SELECT w.id AS watch_id, w.user_id, u.email::text AS email, t.type
        FROM class_watches w
        JOIN auth.users u ON u.id = w.user_id
        LEFT JOIN user_profiles p ON p.user_id = w.user_id
        CROSS JOIN (SELECT DISTINCT u.type FROM unnest(p_types) AS u(type)) AS t
        WHERE w.term = p_term AND w.class_nbr = p_class_nbr
          AND u.email IS NOT NULL AND u.email <> ''
          AND COALESCE(p.notifications_enabled, true)
          AND NOT COALESCE(p.email_bounced, false)
          AND NOT COALESCE(p.spam_complained, false)
          AND NOT COALESCE(p.is_disabled, false)
    ), claimed AS (
        INSERT INTO notifications_sent AS ns (class_watch_id, notification_type, sent_at, expires_at)
        SELECT e.watch_id, e.type, now(), now() + interval '24 hours' FROM eligible e
        ON CONFLICT (class_watch_id, notification_type) DO UPDATE
            SET sent_at = now(), expires_at = now() + interval '24 hours'
            WHERE ns.expires_at <= now()
        RETURNING ns.class_watch_id, ns.notification_type
    )
    SELECT e.watch_id, e.user_id, e.email, e.type
    FROM eligible e
    JOIN claimed c ON c.class_watch_id = e.watch_id AND c.notification_type = e.type
    ORDER BY e.user_id, e.type;
END
$$;

-- Supabase exposes public functions over HTTP to its anon and authenticated roles by default; these
-- change notification state and must stay the daemon's alone.
REVOKE EXECUTE ON FUNCTION seatwatch_sections_to_check(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION seatwatch_observe(text, text, text, text, text, text, integer, integer, integer,
                                             text, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION seatwatch_claim(text, text, boolean, text[]) FROM PUBLIC;
DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['anon', 'authenticated'] LOOP
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            EXECUTE format('REVOKE EXECUTE ON FUNCTION seatwatch_sections_to_check(text) FROM %I', r);
            EXECUTE format('REVOKE EXECUTE ON FUNCTION seatwatch_observe(text, text, text, text, text, text, '
                           'integer, integer, integer, text, text) FROM %I', r);
            EXECUTE format('REVOKE EXECUTE ON FUNCTION seatwatch_claim(text, text, boolean, text[]) FROM %I', r);
        END IF;
    END LOOP;
END
$$;
