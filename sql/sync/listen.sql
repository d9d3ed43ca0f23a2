-- --follow: wake up when the change-tracking trigger of the table notifies its channel.
LISTEN {channel};
