/* server: to be written */
