package io.knib;

import com.google.gson.FieldNamingPolicy;
import com.google.gson.Gson;
import com.google.gson.GsonBuilder;
import java.util.Collections;
import java.util.List;

/**
 * The JSON of requests and answers: Java field (or record component) {@code deltaPathOnPrimary} is JSON
 * {@code delta_path_on_primary}; null fields are left out. Requests are records, which Gson only writes;
 * answers are final classes with private final fields, which any Gson version fills.
 */
final class Json {
    static final Gson GSON = new GsonBuilder()
            .setFieldNamingPolicy(FieldNamingPolicy.LOWER_CASE_WITH_UNDERSCORES)
            .disableHtmlEscaping()
            .create();

    private Json() {}

    /** A request's list: an unmodifiable copy, empty for null. */
    static <T> List<T> copy(List<T> list) {
        return list == null ? List.of() : List.copyOf(list);
    }

    /** A request's optional list: an unmodifiable copy, null for null. */
    static <T> List<T> copyOrNull(List<T> list) {
        return list == null ? null : List.copyOf(list);
    }

    /** An answer's list, read-only: empty when the JSON had none. */
    static <T> List<T> view(List<T> list) {
        return list == null ? List.of() : Collections.unmodifiableList(list);
    }
}
