"""The embedded broker of the one-command local fleet (amqtt): many clients connecting at once."""

from __future__ import annotations

import logging
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from shared.embedded_broker import EmbeddedBroker


def test_clients_connecting_and_subscribing_at_once_all_get_a_session(caplog) -> None:
    """amqtt 0.12.1 walks its subscription table with awaits inside when a session starts; other clients
    subscribing meanwhile made it raise and dropped the new session (seen with nine simulated nodes)."""
    n = 30
    got: dict[int, int] = {}
    clients: list[mqtt.Client] = []
    lock = threading.Lock()
    with caplog.at_level(logging.ERROR), EmbeddedBroker() as broker:
        pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="retainer")
        pub.connect(broker.host, broker.port)
        pub.loop_start()
        for i in range(n):
            pub.publish(f"r/{i}", b"x", qos=1, retain=True).wait_for_publish(5)

        def connect(i: int) -> None:
            c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"c{i}")
            c.on_connect = lambda cl, *_: cl.subscribe([(f"r/{i}", 1)] + [(f"t/{i}/{k}", 1) for k in range(20)])

            def on_message(cl, userdata, msg) -> None:
                with lock:
                    got[i] = got.get(i, 0) + 1

            c.on_message = on_message
            c.connect(broker.host, broker.port)
            c.loop_start()
            with lock:
                clients.append(c)

        threads = [threading.Thread(target=connect, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        deadline = time.monotonic() + 10
        while len(got) < n and time.monotonic() < deadline:
            time.sleep(0.1)
        for c in [*clients, pub]:
            c.disconnect()  # before loop_stop: the network loop then ends at once instead of at its next timeout
            c.loop_stop()
    assert len(got) == n  # every client's session is served: its retained message arrived
    assert not [r for r in caplog.records if "changed size during iteration" in (r.getMessage() + str(r.exc_info))]
