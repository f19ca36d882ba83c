"""The OpenAI-compatible images gateway: organic requests routed to the subnet's miners."""
