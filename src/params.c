/* params: to be written */
