"""Metering: tokens, cost, latency and errors of every proxied request, written as usage events."""
