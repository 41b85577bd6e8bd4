/* resolve: to be written */
