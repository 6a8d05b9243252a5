"""The process that answers Twilio: the Quart app (voice webhook, media stream, health and
metrics), the registry of the calls it serves, admission by load, and the session store."""
