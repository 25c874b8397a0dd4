"""Whether a Redis broker answers: one PING with a short timeout, not a minute of Celery's retries.

``submit`` and ``resume`` (``Client``) and ``pipeq worker`` check the broker this way before they
store or serve anything, so a missing Redis is an error within seconds that says how to start one.
"""

from __future__ import annotations

import shlex
from urllib.parse import urlsplit

from pipeq import constants as C
from pipeq.errors import BrokerError, BrokerUnreachableError
from pipeq.settings import Settings, mask_url

#: URL schemes the probe understands; other brokers (``memory://``, sentinel, AMQP) are not probed.
REDIS_SCHEMES = ("redis", "rediss")
#: Hosts for which the error can say which command starts a Redis.
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "")


def probed_urls(broker_url: str) -> list[str]:
    """The Redis URLs of a broker setting (kombu takes several, ``;``-separated, for failover)."""
    urls = [u.strip() for u in broker_url.split(";") if u.strip()]
    return [u for u in urls if urlsplit(u).scheme in REDIS_SCHEMES]


def ping(url: str, timeout: float = C.BROKER_PROBE_TIMEOUT) -> str | None:
    """None when the Redis at ``url`` answers PING within ``timeout`` seconds, else why not (one line).

    Raises BrokerError when it answers but refuses us (wrong password, a TLS mismatch): a server is
    there, so "start one" would be the wrong advice.
    """
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        client.ping()
        return None
    except redis.AuthenticationError as exc:
        raise BrokerError(f"the Redis at {mask_url(url)} refused pipeq's credentials: {exc}") from None
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        return mask_url(str(exc)).splitlines()[0] if str(exc) else type(exc).__name__
    except redis.RedisError as exc:
        raise BrokerError(f"the Redis at {mask_url(url)} answered with an error: {exc}") from None
    finally:
        client.close()


def start_command(url: str) -> str:
    """A command that starts a Redis where ``url`` points (a local one), to quote in errors."""
    port = urlsplit(url).port or 6379
    return f"redis-server --port {port} --save {shlex.quote('')} --daemonize yes"


def check_broker(settings: Settings) -> None:
    """Raise BrokerUnreachableError, naming the command that starts one, unless the broker answers."""
    urls = probed_urls(settings.broker_url)
    if not urls:
        return
    reasons = []
    for url in urls:
        reason = ping(url)
        if reason is None:
            return
        reasons.append(reason)
    url = urls[0]
    where = mask_url(settings.broker_url)
    if urlsplit(url).hostname in LOCAL_HOSTS or urlsplit(url).hostname is None:
        advice = f"start one with: {start_command(url)} (or `docker compose up -d redis`)"
    else:
        advice = "check that it runs and that PIPEQ_BROKER_URL (or --broker-url) names it"
    raise BrokerUnreachableError(f"no Redis answers at {where} ({reasons[0]}); {advice}")
