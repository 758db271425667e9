"""HTTP clients of the services seatwatch calls: the scraper and the email transports."""
