-- The web app's schema, created only where it is absent.
--
-- Production already has all of this (Supabase, shared with the web app), so every statement here is
-- additive: a table, index, trigger or function is created only when nothing of that name exists, and
-- nothing that exists is dropped, renamed, retyped or redefined. On an empty database this builds the
-- schema the web app expects, including a minimal auth.users when there is no auth schema at all.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'auth') THEN
        CREATE SCHEMA auth;
        CREATE TABLE auth.users (id uuid PRIMARY KEY, email text);
    END IF;
END
$$;

DO $$
BEGIN
    IF to_regclass('public.class_watches') IS NULL THEN
        CREATE TABLE public.class_watches (
            id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
            user_id     uuid NOT NULL REFERENCES auth.users (id) ON DELETE CASCADE,
            term        text NOT NULL,
            subject     text NOT NULL,
            catalog_nbr text NOT NULL,
            class_nbr   text NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT unique_user_class_watch UNIQUE (user_id, term, class_nbr)
        );
        CREATE INDEX idx_class_watches_user_id ON public.class_watches (user_id);
        CREATE INDEX idx_class_watches_class_nbr ON public.class_watches (class_nbr);
        CREATE INDEX idx_class_watches_class_nbr_term ON public.class_watches (class_nbr, term);
        -- The original's partial indexes for the two parity groups of a tick.
        CREATE INDEX idx_class_watches_even ON public.class_watches (class_nbr, term)
            WHERE right(class_nbr, 1) IN ('0', '2', '4', '6', '8');
        CREATE INDEX idx_class_watches_odd ON public.class_watches (class_nbr, term)
            WHERE right(class_nbr, 1) IN ('1', '3', '5', '7', '9');
    END IF;

    IF to_regclass('public.class_states') IS NULL THEN
        CREATE TABLE public.class_states (
            id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
            term            text NOT NULL,
            subject         text NOT NULL,
            catalog_nbr     text NOT NULL,
            class_nbr       text NOT NULL UNIQUE,
            title           text,
            instructor_name text,
            seats_available integer NOT NULL DEFAULT 0,
            seats_capacity  integer NOT NULL DEFAULT 0,
            non_reserved_seats integer,
            location        text,
            meeting_times   text,
            last_checked_at timestamptz NOT NULL DEFAULT now(),
            last_changed_at timestamptz NOT NULL DEFAULT now()
        );
    END IF;

    IF to_regclass('public.notifications_sent') IS NULL THEN
        CREATE TABLE public.notifications_sent (
            id                uuid PRIMARY KEY DEFAULT gen_random_uuid(),
            class_watch_id    uuid NOT NULL REFERENCES public.class_watches (id) ON DELETE CASCADE,
            notification_type text NOT NULL
                CHECK (notification_type IN ('seat_available', 'instructor_assigned')),
            sent_at           timestamptz NOT NULL DEFAULT now(),
            expires_at        timestamptz NOT NULL DEFAULT (now() + interval '24 hours'),
            CONSTRAINT unique_notification UNIQUE (class_watch_id, notification_type)
        );
        CREATE INDEX idx_notifications_sent_watch_id ON public.notifications_sent (class_watch_id);
        CREATE INDEX idx_notifications_sent_expires_at ON public.notifications_sent (expires_at);
    END IF;

    IF to_regclass('public.user_profiles') IS NULL THEN
        CREATE TABLE public.user_profiles (
            id                    uuid PRIMARY KEY DEFAULT gen_random_uuid(),
            user_id               uuid NOT NULL UNIQUE REFERENCES auth.users (id) ON DELETE CASCADE,
            is_disabled           boolean NOT NULL DEFAULT false,
            disabled_at           timestamptz,
            age_verified_at       timestamptz,
            agreed_to_terms_at    timestamptz,
            created_at            timestamptz NOT NULL DEFAULT now(),
            updated_at            timestamptz NOT NULL DEFAULT now(),
            notifications_enabled boolean NOT NULL DEFAULT true,
            unsubscribed_at       timestamptz,
            email_bounced         boolean NOT NULL DEFAULT false,
            email_bounced_at      timestamptz,
            spam_complained       boolean NOT NULL DEFAULT false,
            spam_complained_at    timestamptz,
            is_admin              boolean NOT NULL DEFAULT false
        );
    END IF;
END
$$;

-- Columns the original app added in later migrations; ADD COLUMN IF NOT EXISTS leaves existing ones alone.
ALTER TABLE public.class_states ADD COLUMN IF NOT EXISTS non_reserved_seats integer;
ALTER TABLE public.notifications_sent
    ADD COLUMN IF NOT EXISTS expires_at timestamptz NOT NULL DEFAULT (now() + interval '24 hours');
ALTER TABLE public.user_profiles ADD COLUMN IF NOT EXISTS notifications_enabled boolean NOT NULL DEFAULT true;
ALTER TABLE public.user_profiles ADD COLUMN IF NOT EXISTS unsubscribed_at timestamptz;
ALTER TABLE public.user_profiles ADD COLUMN IF NOT EXISTS email_bounced boolean NOT NULL DEFAULT false;
ALTER TABLE public.user_profiles ADD COLUMN IF NOT EXISTS spam_complained boolean NOT NULL DEFAULT false;
ALTER TABLE public.user_profiles ADD COLUMN IF NOT EXISTS is_disabled boolean NOT NULL DEFAULT false;

-- last_changed_at moves only when seats or the instructor change; last_checked_at moves on every update.
DO $$
BEGIN
    IF to_regprocedure('public.update_class_state_changed_at()') IS NULL THEN
        CREATE FUNCTION public.update_class_state_changed_at() RETURNS trigger
        LANGUAGE plpgsql AS $fn$
        BEGIN
            IF NEW.seats_available IS DISTINCT FROM OLD.seats_available
               OR NEW.instructor_name IS DISTINCT FROM OLD.instructor_name THEN
                NEW.last_changed_at = now();
            END IF;
            NEW.last_checked_at = now();
            RETURN NEW;
        END
        $fn$;
    END IF;
    IF NOT EXISTS (
        SELECT 1 FROM pg_trigger
        WHERE tgrelid = 'public.class_states'::regclass AND NOT tgisinternal
          AND tgfoid = 'public.update_class_state_changed_at()'::regprocedure
    ) THEN
        CREATE TRIGGER update_class_states_changed_at
            BEFORE UPDATE ON public.class_states
            FOR EACH ROW EXECUTE FUNCTION public.update_class_state_changed_at();
    END IF;
END
$$;

-- The web app's functions, as the original defined them (see BACKGROUND.md). seatwatch itself uses its own
-- seatwatch_* functions (0002) that match on term and re-open expired claims.
DO $$
BEGIN
    IF to_regprocedure('public.get_sections_to_check(text)') IS NULL THEN
        -- A class number ending in a non-digit is in neither parity group (the original raised an error).
        CREATE FUNCTION public.get_sections_to_check(stagger_type text)
        RETURNS TABLE (class_nbr text, term text)
        LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public AS $fn$
            SELECT DISTINCT cw.class_nbr, cw.term
            FROM class_watches cw
            WHERE CASE stagger_type
                WHEN 'even' THEN CASE WHEN right(cw.class_nbr, 1) ~ '^[0-9]$'
                                      THEN right(cw.class_nbr, 1)::int % 2 = 0 ELSE false END
                WHEN 'odd' THEN CASE WHEN right(cw.class_nbr, 1) ~ '^[0-9]$'
                                     THEN right(cw.class_nbr, 1)::int % 2 = 1 ELSE false END
                ELSE true
            END
            ORDER BY cw.class_nbr;
        $fn$;
    END IF;

    IF to_regprocedure('public.get_watchers_for_sections(text[])') IS NULL THEN
        CREATE FUNCTION public.get_watchers_for_sections(section_numbers text[])
        RETURNS TABLE (user_id uuid, email text, watch_id uuid, class_nbr text)
        LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public AS $fn$
            SELECT cw.user_id, u.email::text, cw.id, cw.class_nbr
            FROM class_watches cw
            JOIN auth.users u ON u.id = cw.user_id
            LEFT JOIN user_profiles up ON up.user_id = cw.user_id
            WHERE cw.class_nbr = ANY (section_numbers)
              AND COALESCE(up.notifications_enabled, true)
              AND NOT COALESCE(up.email_bounced, false)
              AND NOT COALESCE(up.spam_complained, false)
              AND NOT COALESCE(up.is_disabled, false)
            ORDER BY cw.class_nbr, cw.user_id;
        $fn$;
    END IF;

    IF to_regprocedure('public.try_record_notification(uuid, text, integer)') IS NULL THEN
        CREATE FUNCTION public.try_record_notification(
            p_class_watch_id uuid, p_notification_type text, p_expires_hours integer DEFAULT 24
        ) RETURNS boolean
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = public AS $fn$
        BEGIN
            IF p_notification_type NOT IN ('seat_available', 'instructor_assigned') THEN
                RAISE EXCEPTION 'invalid notification type: %', p_notification_type;
            END IF;
            IF p_expires_hours < 1 OR p_expires_hours > 168 THEN
                RAISE EXCEPTION 'expiry hours must be between 1 and 168, got %', p_expires_hours;
            END IF;
            IF EXISTS (
                SELECT 1 FROM notifications_sent
                WHERE class_watch_id = p_class_watch_id
                  AND notification_type = p_notification_type
                  AND expires_at > now()
            ) THEN
                RETURN false;
            END IF;
            INSERT INTO notifications_sent (class_watch_id, notification_type, sent_at, expires_at)
            VALUES (p_class_watch_id, p_notification_type, now(), now() + make_interval(hours => p_expires_hours));
            RETURN true;
        EXCEPTION WHEN unique_violation THEN
            RETURN false;
        END
        $fn$;
    END IF;
END
$$;
