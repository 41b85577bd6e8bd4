/* loop: to be written */
