/* table: to be written */
