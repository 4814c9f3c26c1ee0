"""The services of the configured topology, in the order `stack up` starts them."""

from __future__ import annotations

from flashsale.stack.layout import StackLayout
from flashsale.stack.mariadb import MariaDBService
from flashsale.stack.redis_nodes import nodes
from flashsale.stack.rocketmq import BrokerService, GroupBroker, NamesrvService, ProxyService
from flashsale.stack.service import Service
from flashsale.stack.settings import StackSettings


def services(layout: StackLayout, settings: StackSettings) -> list[Service]:
    """Every service of the stack's topology, in start order (the broker registers with the name server)."""
    groups = settings.topology.broker_groups
    rocketmq: list[Service] = (
        [BrokerService(layout, settings)]
        if groups == 1
        else [*(GroupBroker(layout, settings, i) for i in range(groups)), ProxyService(layout, settings)]
    )
    return [
        *nodes(layout, settings),
        MariaDBService(layout, settings),
        NamesrvService(layout, settings),
        *rocketmq,
    ]
