"""Demand prediction from usage history, published as prewarm and demote hints."""
