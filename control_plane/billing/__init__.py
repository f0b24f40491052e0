"""Prices per base model and monthly invoices (charges, royalties paid and earned)."""
