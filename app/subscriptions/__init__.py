"""Subscriptions: streams that wake workers, by signed webhook or by a wake event to claim (pull-wake)."""
