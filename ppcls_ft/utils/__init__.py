"""Small helpers with no model or training knowledge: safe weight reading, downloads, logging."""
