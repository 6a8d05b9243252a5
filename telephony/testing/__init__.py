"""The testing kit, shipped so users can test their own agents: a caller that behaves like
Twilio, replay of recorded calls, a virtual-clock event loop, the pytest plugin and a Gemini
Live stand-in. The server never imports it; importing this package imports nothing."""
