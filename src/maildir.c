/* maildir: to be written */
