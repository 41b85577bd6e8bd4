/* settings: to be written */
