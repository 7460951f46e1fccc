"""One sentence for why a store client failed: refused credentials, missing rights, TLS."""

from __future__ import annotations

from schemas.settings import StoreRole, StoreSettings

_HINT = "the passwords `pulse up --acl` made are in $PULSE_HOME/secrets.env"


def describe(exc: BaseException, store: StoreSettings, role: StoreRole | None) -> str:
    """Why ``exc`` happened to a ``role`` client of ``store``, as one sentence with no period.

    Never includes a password.
    """
    import redis

    user = store.credentials(role)[0]
    who = f"user {user}" if user else "the default user"
    where = store.url()
    text = " ".join(str(exc).split()).rstrip(".")
    upper = text.upper()
    if isinstance(exc, redis.AuthenticationError) and "NOAUTH" not in upper:
        return (
            f"the store at {where} refused the password of {who} (wrong password, or no such "
            f"user, or the user is disabled); {_HINT}"
        )
    if "NOAUTH" in upper or "AUTHENTICATION REQUIRED" in upper:
        return f"the store at {where} requires a password and none is set; {_HINT}"
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return f"{who} may not do this on the store at {where}: {text}"
    if any(s in upper for s in ("SSL", "CERTIFICATE", "TLS")):
        return f"the TLS connection to the store at {where} failed: {text}"
    if store.tls is False and isinstance(exc, redis.ConnectionError):
        return (
            f"cannot reach the store at {where}: {text} (if the store runs TLS, set "
            "PULSE_STORE_TLS and its CA, as `pulse up --tls` does)"
        )
    return f"cannot use the store at {where}: {text}"


def is_configuration_error(exc: BaseException) -> bool:
    """Whether retrying cannot help: refused credentials or rights, a failed TLS handshake."""
    import redis

    if isinstance(exc, redis.AuthenticationError | redis.exceptions.NoPermissionError):
        return True
    text = str(exc).upper()
    return isinstance(exc, redis.ConnectionError) and ("SSL" in text or "CERTIFICATE" in text)


def check(store: StoreSettings, role: StoreRole) -> str | None:
    """One sentence if ``role`` cannot use the store for a reason retrying will not fix.

    A store that is down or still starting is not such a reason (None): callers wait for it.
    """
    import redis

    from schemas.settings import store_client

    try:
        with store_client(store, role=role, timeout_s=5.0) as client:
            client.ping()
    except (redis.RedisError, OSError) as exc:
        return describe(exc, store, role) if is_configuration_error(exc) else None
    return None
