using System.Globalization;
using System.Text;

namespace QcowTier.Cli.Infrastructure;

/// <summary>
/// A JSON object that prints its members in the order QEMU's QDict iterates them (hash bucket order,
/// newest first within a bucket), so that --output=json is byte-for-byte what qemu-img prints.
/// </summary>
internal sealed class QDict
{
    private const int Buckets = 512;
    private readonly List<(string Key, object Value)> _members = [];

    public QDict Add(string key, object value)
    {
        _members.Add((key, value));
        return this;
    }

    public IEnumerable<(string Key, object Value)> InQemuOrder()
        => _members.Select((m, index) => (m, index))
            .OrderBy(x => Bucket(x.m.Key))
            .ThenByDescending(x => x.index)
            .Select(x => x.m);

    /// <summary>QEMU's tdb_hash, reduced to a bucket of its QDict table.</summary>
    internal static uint Bucket(string key)
    {
        var bytes = Encoding.UTF8.GetBytes(key);
        unchecked
        {
            var value = 0x238F13AFu * (uint)bytes.Length;
            for (var i = 0; i < bytes.Length; i++)
            {
                value += (uint)bytes[i] << (i * 5 % 24);
            }
            return (1103515243u * value + 12345u) % Buckets;
        }
    }

    /// <summary>qobject_to_json_pretty: four-space indentation, "key": value.</summary>
    public string ToPrettyJson()
    {
        var sb = new StringBuilder();
        Write(sb, this, 0);
        return sb.ToString();
    }

    /// <summary>A JSON list of objects, as qemu-img info --backing-chain prints it.</summary>
    public static string ToPrettyJson(IReadOnlyList<QDict> list)
    {
        var sb = new StringBuilder();
        Write(sb, list.ToList<object>(), 0);
        return sb.ToString();
    }

    private static void Write(StringBuilder sb, object value, int depth)
    {
        switch (value)
        {
            case QDict dict:
                var members = dict.InQemuOrder().ToList();
                if (members.Count == 0)
                {
                    sb.Append("{}");
                    return;
                }
                sb.Append('{');
                for (var i = 0; i < members.Count; i++)
                {
                    sb.Append(i == 0 ? "\n" : ",\n");
                    sb.Append(' ', (depth + 1) * 4);
                    AppendString(sb, members[i].Key);
                    sb.Append(": ");
                    Write(sb, members[i].Value, depth + 1);
                }
                sb.Append('\n').Append(' ', depth * 4).Append('}');
                return;
            case System.Collections.IList list:
                if (list.Count == 0)
                {
                    // As qobject_to_json_pretty: the newline and indentation come even without members.
                    sb.Append("[\n").Append(' ', depth * 4).Append(']');
                    return;
                }
                sb.Append('[');
                for (var i = 0; i < list.Count; i++)
                {
                    sb.Append(i == 0 ? "\n" : ",\n");
                    sb.Append(' ', (depth + 1) * 4);
                    Write(sb, list[i]!, depth + 1);
                }
                sb.Append('\n').Append(' ', depth * 4).Append(']');
                return;
            case bool b:
                sb.Append(b ? "true" : "false");
                return;
            case string s:
                AppendString(sb, s);
                return;
            case IFormattable f:
                sb.Append(f.ToString(null, CultureInfo.InvariantCulture));
                return;
            default:
                throw new ArgumentException($"unsupported JSON value {value}", nameof(value));
        }
    }

    /// <summary>QEMU escapes control characters and everything outside printable ASCII as \uXXXX.</summary>
    internal static void AppendString(StringBuilder sb, string s)
    {
        sb.Append('"');
        foreach (var c in s)
        {
            switch (c)
            {
                case '"':
                    sb.Append("\\\"");
                    break;
                case '\\':
                    sb.Append("\\\\");
                    break;
                case '\b':
                    sb.Append("\\b");
                    break;
                case '\f':
                    sb.Append("\\f");
                    break;
                case '\n':
                    sb.Append("\\n");
                    break;
                case '\r':
                    sb.Append("\\r");
                    break;
                case '\t':
                    sb.Append("\\t");
                    break;
                default:
                    if (c < 0x20 || c >= 0x7f)
                    {
                        sb.Append("\\u").Append(((int)c).ToString("X4", CultureInfo.InvariantCulture));
                    }
                    else
                    {
                        sb.Append(c);
                    }
                    break;
            }
        }
        sb.Append('"');
    }
}
