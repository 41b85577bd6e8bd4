/* buf: to be written */
