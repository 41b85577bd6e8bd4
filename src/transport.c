/* transport: to be written */
